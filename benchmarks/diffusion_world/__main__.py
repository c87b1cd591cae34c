"""``erasekit bench diffusion-world [--train] [--guard none|cgce|cgce+irece] [--quick] ...``

Without ``--train``: load the committed world and print the CRR/utility table for the chosen
guard (``none`` = the unguarded baseline). With ``--train``: (re)train the world, resumable.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _calibrated_guard_factory(kind: str, world, concepts: list[str], n_prompts: int):
    """Calibrate CGCE (and IRECE) packs on the world's TRAINING prompts, then guard with them."""
    from erasekit.guardrails.concept import Concept
    from erasekit.integrations.diffusers import guard
    from erasekit.integrations.diffusers_calibrate import calibrate_cgce, calibrate_irece

    packs = []
    for c in concepts:
        concept = Concept(c, forget=tuple(world.train_prompts(c, n_prompts, seed=1)),
                          retain=tuple(world.retain_prompts(c, n_prompts, seed=1)), keywords=(c,))
        packs.append(calibrate_cgce(world.pipe, concept))
        if kind == "cgce+irece":
            packs.append(calibrate_irece(world.pipe, concept))
    return lambda pipe: guard(pipe, packs=packs)


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="erasekit bench diffusion-world", description=__doc__)
    p.add_argument("--train", action="store_true", help="train (or resume training) the world")
    p.add_argument("--work-dir", default=None, help="training checkpoints (default: <cache>/diffusion-world/train-work)")
    p.add_argument("--world", default=None, help="world weights folder (default: the committed one)")
    p.add_argument("--unet-steps", type=int, default=None, help="override the UNet training steps")
    p.add_argument("--guard", default="none", choices=["none", "cgce", "cgce+irece"])
    p.add_argument("--calibration-prompts", type=int, default=200, help="forget/retain prompts per concept (cgce)")
    p.add_argument("--concepts", default=None, help="comma-separated concepts (default: all; --quick: circle,red)")
    p.add_argument("--quick", action="store_true", help="few images and steps: the CI/test mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--out", default="bench_out/diffusion-world")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.train:
        from dataclasses import replace

        from erasekit.testing.assets import cache_dir
        from erasekit.testing.diffusion_world import default_weights_dir
        from erasekit.testing.diffusion_world.train import TrainConfig, train_world

        cfg = TrainConfig()
        if args.unet_steps is not None:
            cfg = replace(cfg, unet_steps=args.unet_steps)
        out = Path(args.world) if args.world else default_weights_dir()
        work = Path(args.work_dir) if args.work_dir else cache_dir() / "diffusion-world" / "train-work"
        meta = train_world(out, work, cfg)
        print(f"world written to {out}: detector accuracy on held-out real scenes "
              f"{meta['detector_accuracy_heldout_real']}")
        return 0

    from benchmarks.diffusion_world import NoGuard, run_benchmark
    from erasekit.testing.diffusion_world import load_world

    world = load_world(args.world)
    concepts = args.concepts.split(",") if args.concepts else None
    if args.guard == "none":
        factory = NoGuard
    else:
        todo = concepts or (["circle", "red"] if args.quick else [c for f in world.concepts.values() for c in f])
        factory = _calibrated_guard_factory(args.guard, world, todo, args.calibration_prompts)
    result = run_benchmark(factory, concepts, args.out, args.quick, world=world, seed=args.seed, guard_name=args.guard)
    print((Path(args.out) / "table.md").read_text())
    print(f"wrote {args.out}/results.json, table.md, grid.png in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
