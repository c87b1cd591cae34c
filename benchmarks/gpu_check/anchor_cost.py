"""What CGCE's conditioning work costs per call at SD-1.5 sizes, by component, with many repetitions.

Why by component: whole-call paired timings on a lent GPU moved by up to 2x between identical calls
(gpu_check D on an H100, 2026-11-26), far more than the few percent they were to resolve. The guard's
work happens once per call (at the first denoiser step, then cached), so its cost is measured directly:
milliseconds inside ``DiffusersGuard._condition`` (detection, ``anchor_text`` re-encode, refinement) for
flagged calls with and without ``anchor_text``, beside one UNet forward of the call's CFG batch -- the
unit a call repeats ``steps`` times. Random weights (``benchmarks.gpu_check.sd15``): cost, not efficacy.

``python -m benchmarks.gpu_check.anchor_cost --out DIR [--device cuda] [--reps 15] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.gpu_check.common import log, sync
from benchmarks.gpu_check.sd15 import (
    ANCHOR_TEXT,
    CONCEPT,
    _phase_ms,
    _prompts,
    build_pipeline,
    tokenizer_dir,
    warm_clock,
)


def _ms(fn: Any, reps: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "p10": round(float(np.percentile(values, 10)), 3),
            "p90": round(float(np.percentile(values, 90)), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check.anchor_cost", description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="shrunk components (CPU dry run)")
    p.add_argument("--clip-tokenizer", default=None)
    p.add_argument("--warmup-s", type=float, default=10.0,
                   help="seconds of UNet forwards before timing (a lent GPU idles at a low clock: the first "
                        "run measured b1's UNet forward slower than b4's)")
    args = p.parse_args(argv)

    from erasekit import Concept
    from erasekit.integrations.diffusers import guard
    from erasekit.integrations.diffusers_calibrate import calibrate_cgce

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = build_pipeline(device, dtype, args.quick, tokenizer_dir(args.clip_tokenizer))
    world = _prompts()
    n = 16 if args.quick else 64
    concept = Concept(CONCEPT, forget=world.train_prompts(CONCEPT, n, seed=1),
                      retain=world.retain_prompts(CONCEPT, n, seed=1), keywords=[CONCEPT])
    pack = calibrate_cgce(pipe, concept, C=0.01)
    from benchmarks.diffusion_erasure import tuned_cgce_hyperparameters, with_hyperparameters

    pack = with_hyperparameters(pack, **tuned_cgce_hyperparameters())
    anchored_pack = with_hyperparameters(pack, anchor_text=ANCHOR_TEXT)
    size = 64 if args.quick else 512
    latent = size // 8
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "dtype": str(dtype), "reps": args.reps, "size": size,
                              "anchor_text": ANCHOR_TEXT, "warmup_s": args.warmup_s,
                              "batches": {}}
    warm_clock(pipe, device, args.warmup_s, latent)
    for b in (1, 4):
        direct = world.direct_prompts(CONCEPT, b, 21)
        row: dict[str, Any] = {}
        with torch.no_grad():
            cond = pipe.encode_prompt(direct, device, 1, False)[0]
            states = torch.cat([cond, cond])
            lat = torch.randn(2 * b, 4, latent, latent, device=device, dtype=dtype)
            pipe.unet(lat, 500, encoder_hidden_states=states)
            row["unet_cfg_forward_ms"] = _summary(_ms(lambda lat=lat, states=states: pipe.unet(
                lat, 500, encoder_hidden_states=states), args.reps, device))
            row["encode_prompt_ms"] = _summary(_ms(lambda direct=direct: pipe.encode_prompt(
                direct, device, 1, False), args.reps, device))
            row["tokenize_ms"] = _summary(_ms(lambda direct=direct: pipe.tokenizer(
                direct, padding="max_length", max_length=77, truncation=True, return_tensors="pt"), args.reps, device))
        for name, pk in (("flagged", pack), ("anchored_flagged", anchored_pack)):
            g = guard(pipe, [pk])
            try:
                def call(g: Any = g, direct: list[str] = direct) -> None:
                    gens = [torch.Generator(gen_device).manual_seed(i) for i in range(len(direct))]
                    with torch.no_grad():  # two steps: the guard's work is done at the first and cached
                        g(direct, generator=gens, erase=[CONCEPT], num_inference_steps=2, height=size, width=size,
                          guidance_scale=7.5, output_type="latent")

                call()
                phases = [_phase_ms(g, call, device) for _ in range(args.reps)]
            finally:
                g.detach()
            for key in ("_condition", "_anchor_text"):
                if key in phases[0]:
                    row[f"{name}{key}_ms"] = _summary([ph[key] for ph in phases])
        unet = row["unet_cfg_forward_ms"]["median"]
        for steps in (20, 50):
            row[f"share_of_{steps}_step_call"] = {
                k[: -len("_ms")]: round(v["median"] / (steps * unet), 5)
                for k, v in row.items() if k.endswith("_condition_ms") or k.endswith("_anchor_text_ms")}
        result["batches"][f"b{b}"] = row
        log(f"b{b}: {json.dumps(row)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "anchor_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
