"""Embedding classifiers for CGCE: scikit-learn fit, ONNX export, onnxruntime detection, torch twin for guidance."""
