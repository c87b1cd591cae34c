# ruff: noqa
"""What an anchored flagged call adds: one text-encoder pass over its flagged prompts, against the call's denoising.

On the world the text encoder (MiniLM, 22 M parameters) is large next to its 1.2 M-parameter UNet, so the
extra pass is a visible share of a call (see overhead_s13_dots.json). This times the same two pieces at
SD-1.5 sizes (random weights: CLIP-L text encoder, SD-1.5 UNet; `benchmarks.gpu_check.sd15`) on this CPU:
one ``encode_prompt`` of one prompt (CFG off, as the guard calls it) and one UNet forward of that image's
CFG batch (2 rows, 64 x 64 latents), and reports encode / (steps x UNet) for 20 and 50 steps.
Usage: ``PYTHONPATH=. python benchmarks/diffusion_erasure/results/cgce_anchor_text/encode_cost.py [THREADS]``.
"""
import json, statistics, sys, time
from pathlib import Path
import torch
from benchmarks.gpu_check.sd15 import build_pipeline

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.set_num_threads(threads)
pipe = build_pipeline(torch.device("cpu"), torch.float32, quick=False, tok_dir=None)
prompt = ["a photo of a red star on a grey background with a plain fill"]
with torch.no_grad():
    enc = lambda: pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    cond = enc()
    t_enc = []
    for _ in range(7):
        t = time.perf_counter(); enc(); t_enc.append(time.perf_counter() - t)
    latents = torch.randn(2, 4, 64, 64)
    states = torch.cat([cond, cond])
    pipe.unet(latents, 500, encoder_hidden_states=states)  # warm-up
    t_unet = []
    for _ in range(3):
        t = time.perf_counter(); pipe.unet(latents, 500, encoder_hidden_states=states); t_unet.append(time.perf_counter() - t)
e, u = statistics.median(t_enc), statistics.median(t_unet)
out = {"threads": threads, "encode_prompt_s": e, "unet_cfg_forward_s": u,
       "share_of_call_20_steps": e / (20 * u), "share_of_call_50_steps": e / (50 * u)}
print(json.dumps(out, indent=1))
Path(__file__).with_name("encode_cost.json").write_text(json.dumps(out, indent=1) + "\n")
