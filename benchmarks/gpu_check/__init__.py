"""One-shot GPU check of erasekit's three integrations: ``python -m benchmarks.gpu_check --out DIR``.

Sections (each isolated: a failure is recorded with its traceback and the next section runs):

* A -- transformers guard (tiny Llama and a SmolLM2-shaped random Llama; packs calibrated on the device)
* B -- the vLLM edit op, torch only (fused plan vs reference, CUDA graphs whole vs piecewise, op cost)
* C -- diffusers guard on the diffusion world (CGCE; IRECE with ``--irece``)
* D -- diffusers guard (CGCE) on an SD1.5-sized random pipeline, fp16, 512x512, 20 steps, batch 1 and 4

Writes ``DIR/gpu_check.json`` (every measured number, check and traceback) and ``DIR/gpu_check.md``.
"""
