"""One-shot GPU check of erasekit's three integrations: ``python -m benchmarks.gpu_check --out DIR``.

Sections (each isolated: a failure is recorded with its traceback and the next section runs):

* A -- transformers guard (tiny Llama and a SmolLM2-shaped random Llama; packs calibrated on the device)
* B -- the vLLM edit op, torch only (fused plan vs reference, CUDA graphs whole vs piecewise, op cost)
* C -- diffusers guard on the diffusion world (CGCE; IRECE with ``--irece``)

Writes ``DIR/gpu_check.json`` (every measured number, check and traceback) and ``DIR/gpu_check.md``.
"""
