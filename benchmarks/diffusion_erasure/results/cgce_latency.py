"""CGCE latency alone, paired: ``PYTHONPATH=. python benchmarks/diffusion_erasure/results/cgce_latency.py PACKS [REPS] [--irece] [--irece-cache DIR]``.

``--irece`` times CGCE + IRECE instead (IRECE calibrated here with the tuned settings, as the
benchmark does: about 1000 generations, a few minutes on one thread). ``--irece-cache DIR``
(implies ``--irece``) saves that calibrated IRECE pack under ``DIR/<concept>-irece`` and loads it
from there on later runs, so reruns skip the calibration (delete the folder after retuning).

The benchmark's overhead section times both guards in one pass; on a shared box its medians move by
several percent (it once measured +17 % on *benign* prompts, where the guard only runs a 0.03 ms
ONNX call). This script repeats the CGCE part with more interleaved repetitions, reports both the
ratio of medians and the median of per-repetition paired ratios, and times ``refine`` itself
inside the guard. PACKS_DIR is a benchmark run's ``packs`` folder (e.g. bench_out/diffusion-erasure/packs).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _parse(argv: list[str]) -> tuple[list[str], bool, str | None]:
    """Positional arguments, whether IRECE is timed, and the IRECE pack cache folder (if any)."""
    args, cache, rest = [], None, iter(argv)
    with_irece = False
    for a in rest:
        if a == "--irece":
            with_irece = True
        elif a == "--irece-cache":
            cache, with_irece = next(rest), True
        else:
            args.append(a)
    return args, with_irece, cache


def _irece_pack(de, world, concept: str, packs: str, cache: str | None):  # noqa: ANN001, ANN202
    """The tuned IRECE pack for ``concept``: from ``cache`` if saved there, else calibrated (and saved)."""
    from pathlib import Path

    from erasekit.guardrails.pack import ConceptPack

    path = Path(cache) / f"{concept}-irece" if cache else None
    if path is not None and path.is_dir():
        return ConceptPack.from_pretrained(path)
    calibrated = de.calibrate_packs(world, [concept], 300, de.tuned_irece_hyperparameters(), Path(packs),
                                    de.tuned_cgce_hyperparameters())
    irece = calibrated[concept]["irece"]
    if path is not None:
        irece.save_pretrained(path)
    return irece


def main() -> None:
    import torch

    from benchmarks import diffusion_erasure as de
    from erasekit.guardrails.pack import ConceptPack
    from erasekit.integrations import diffusers as dmod
    from erasekit.integrations.diffusers import guard
    from erasekit.testing.diffusion_world import load_world

    torch.set_num_threads(1)
    args, with_irece, irece_cache = _parse(sys.argv[1:])
    packs, reps, concept = args[0], int(args[1]) if len(args) > 1 else 15, "circle"
    timings: list[tuple[float, int]] = []
    original = dmod.refine

    def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        t0 = time.perf_counter()
        result = original(*args, **kwargs)
        timings.append((time.perf_counter() - t0, result.steps))
        return result

    dmod.refine = timed
    with de.quiet_libraries():
        world = load_world()
        world.pipe.set_progress_bar_config(disable=True)
        pack = de.with_hyperparameters(ConceptPack.from_pretrained(f"{packs}/{concept}-cgce-v2-300"),
                                       **de.tuned_cgce_hyperparameters())
        guard_packs = [pack]
        if with_irece:
            guard_packs = [pack, _irece_pack(de, world, concept, packs, irece_cache)]
        benign = [s.prompt for s in world.benign_specs(concept, 4, 3)]  # the benchmark's overhead prompts
        flagged = world.direct_prompts(concept, 4, 3)
        g = guard(world.pipe, guard_packs)
        times: dict[str, list[float]] = {k: [] for k in ("base_benign", "guard_benign", "base_flagged", "guard_flagged")}

        def clock(fn) -> float:  # noqa: ANN001
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        for _ in range(reps):
            times["base_benign"].append(clock(lambda: world.generate(benign, 0)))
            times["guard_benign"].append(clock(lambda: world.generate(benign, 0, call=g, erase=[concept])))
            times["base_flagged"].append(clock(lambda: world.generate(flagged, 0)))
            times["guard_flagged"].append(clock(lambda: world.generate(flagged, 0, call=g, erase=[concept])))
        g.detach()
    med = {k: statistics.median(v) for k, v in times.items()}
    pair = {k: statistics.median([a / b - 1 for a, b in zip(times[f"guard_{k}"], times[f"base_{k}"], strict=True)])
            for k in ("benign", "flagged")}
    print(json.dumps({
        "guard": "cgce+irece" if with_irece else "cgce", "reps": reps, "images_per_call": 4, "median_s": med,
        "overhead_ratio_of_medians": {k: med[f"guard_{k}"] / med[f"base_{k}"] - 1 for k in ("benign", "flagged")},
        "overhead_paired_median": pair,
        "refine_ms_median": 1e3 * statistics.median(t for t, _ in timings),
        "refine_steps": sorted({s for _, s in timings}),
    }, indent=1))


if __name__ == "__main__":
    main()
