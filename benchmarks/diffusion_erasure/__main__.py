"""``erasekit bench diffusion [--tune] [--quick] [--concepts a,b] [--world DIR] [--out DIR]``

Calibrates CGCE + IRECE packs on the trained world, optionally re-tunes IRECE, runs the world
benchmark for both guards, times them, and prints the acceptance table (see the package docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks import diffusion_erasure as de
    from erasekit.testing.diffusion_world import load_world

    p = argparse.ArgumentParser(prog="erasekit bench diffusion", description=__doc__)
    p.add_argument("--world", default=None, help="world weights folder (default: the committed one)")
    p.add_argument("--concepts", default=None, help=f"comma-separated (default {','.join(de.EVAL_CONCEPTS)})")
    p.add_argument("--tune", action="store_true", help="grid-search IRECE first and write irece_tuned.json")
    p.add_argument("--tune-concepts", default=",".join(de.TUNE_CONCEPTS))
    p.add_argument("--tune-images", type=int, default=6)
    p.add_argument("--tune-cgce", action="store_true", help="grid the CGCE margin first and write cgce_tuned.json")
    p.add_argument("--calibration-prompts", type=int, default=400)
    p.add_argument("--cgce-negative-guidance", action="store_true",
                   help="CGCE negative guidance on (flagged rows' uncond embedding = the concept's text)")
    p.add_argument("--cgce-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a tuned CGCE hyperparameter for this run (JSON value), e.g. margin=1.5")
    p.add_argument("--cgce-no-anchor-text", action="store_true",
                   help="CGCE without anchor text (style concepts otherwise name 'with a plain fill' instead)")
    p.add_argument("--cgce-no-subphrases", action="store_true",
                   help="CGCE calibrated without sub-phrase augmentation (the s13b configuration; adopted in "
                        "results/cgce_subphrases/DECISION.md)")
    p.add_argument("--cgce-detection-head", action="store_true",
                   help="CGCE packs with a separate detection head attending to the concept's training synonyms")
    p.add_argument("--anchor-text-dtype", default="bfloat16", choices=["pipeline", "bfloat16", "float16", "float32"],
                   help="precision of the guard's anchor_text re-encoding ('pipeline': the pipeline's own; "
                        "bfloat16 adopted in results/cgce_anchor_bf16/)")
    p.add_argument("--quick", action="store_true", help="few images/steps (CI smoke)")
    p.add_argument("--skip-eval", action="store_true", help="only tune (with --tune)")
    p.add_argument("--overhead-reps", type=int, default=30,
                   help="interleaved repetitions of the latency section (4 images per call, ~1 min per 8 reps)")
    p.add_argument("--overhead-only", action="store_true",
                   help="calibrate the first concept only, time it, write overhead.json (results.json untouched)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench_out/diffusion-erasure")
    args = p.parse_args(argv)
    if args.overhead_reps < 1:
        p.error(f"--overhead-reps must be at least 1, got {args.overhead_reps}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with de.quiet_libraries():
        world = load_world(args.world)
        world.pipe.set_progress_bar_config(disable=True)
        cache = out / "packs"
        if args.tune_cgce:
            rep = de.run_cgce_tuning(world, args.tune_concepts.split(","), args.calibration_prompts, args.tune_images,
                                     cache, "python -m benchmarks.diffusion_erasure " + " ".join(argv or sys.argv[1:]))
            print(f"CGCE tuned: {rep['best']['hyperparameters']} (CRR {rep['unguarded_crr']:.3f} -> {rep['best']['crr']:.3f})")
            if args.skip_eval:
                return 0
        if args.tune:
            tune_concepts = args.tune_concepts.split(",")
            packs = de.calibrate_packs(world, tune_concepts, args.calibration_prompts, None, cache)
            from benchmarks.diffusion_world import FULL, QUICK

            s = QUICK if args.quick else FULL
            cgce_report = de.tune_cgce(world, packs, args.tune_images)
            cgce_hp = cgce_report["best"]["hyperparameters"]
            print(f"CGCE tuned on {tune_concepts}: direct+multi CRR {cgce_report['unguarded_crr']:.3f} unguarded -> "
                  f"{cgce_report['best']['crr']:.3f} with {cgce_hp}")
            (out / "cgce_tuning.json").write_text(json.dumps(cgce_report, indent=2) + "\n")
            packs = {c: {**p, "cgce": de.with_hyperparameters(p["cgce"], **cgce_hp)} for c, p in packs.items()}
            report = de.tune_irece(world, packs, args.tune_images, s.ti_steps, s.ti_images)
            best = report["best"]
            print(f"IRECE tuned on {tune_concepts}: CGCE-only attack CRR {report['cgce_only']['attack_crr']:.3f} -> "
                  f"{best['attack_crr']:.3f} with {best['hyperparameters']} (benign ratio {best['benign_ratio']:.3f})")
            (out / "irece_tuning.json").write_text(json.dumps(report, indent=2) + "\n")
            if not args.quick:
                de.TUNED_PATH.write_text(json.dumps({
                    "hyperparameters": best["hyperparameters"], "attack_crr": best["attack_crr"],
                    "cgce_hyperparameters": cgce_hp, "cgce_tuning_crr": cgce_report["best"]["crr"],
                    "cgce_only_attack_crr": report["cgce_only"]["attack_crr"], "benign_ratio": best["benign_ratio"],
                    "tune_concepts": tune_concepts, "seed": report["seed"], "n_images": report["n_images"],
                    "command": "python -m benchmarks.diffusion_erasure " + " ".join(argv or sys.argv[1:]),
                }, indent=2) + "\n")
            if args.skip_eval:
                return 0
        concepts = args.concepts.split(",") if args.concepts else (["circle", "red"] if args.quick else
                                                                   de.EVAL_CONCEPTS)
        hp, cgce_hp = de.tuned_irece_hyperparameters(), de.tuned_cgce_hyperparameters()
        if args.cgce_negative_guidance:
            cgce_hp = {**cgce_hp, "negative_guidance": 1}
        for item in args.cgce_set:
            key, _, value = item.partition("=")
            cgce_hp = {**cgce_hp, key: json.loads(value)}
        guard_options = {"anchor_text_dtype": None if args.anchor_text_dtype == "pipeline" else args.anchor_text_dtype}
        reps = 2 if args.quick else args.overhead_reps
        if args.overhead_only:
            packs = de.calibrate_packs(world, concepts[:1], args.calibration_prompts, hp, cache, cgce_hp,
                                       anchor_text=not args.cgce_no_anchor_text,
                                       detection_head=args.cgce_detection_head,
                                       subphrases=not args.cgce_no_subphrases)
            overhead = de.measure_overhead(world, packs, concepts[0], reps, guard_options=guard_options)
            overhead["seconds"] = round(time.time() - t0, 1)
            (out / "overhead.json").write_text(json.dumps(overhead, indent=2) + "\n")
            for k in ("cgce", "cgce+irece"):
                print(f"{k}: added latency benign {100 * overhead[k]['benign_overhead']:+.2f} %, flagged "
                      f"{100 * overhead[k]['flagged_overhead']:+.2f} % (median of {overhead['reps']} paired reps)")
            print(f"wrote {out}/overhead.json in {overhead['seconds']} s")
            return 0
        packs = de.calibrate_packs(world, concepts, args.calibration_prompts, hp, cache, cgce_hp,
                                   anchor_text=not args.cgce_no_anchor_text,
                                   detection_head=args.cgce_detection_head,
                                   subphrases=not args.cgce_no_subphrases)
        results = de.evaluate(world, packs, concepts, out, args.quick, guard_options=guard_options)
        overhead = de.measure_overhead(world, packs, concepts[0], reps, guard_options=guard_options)
        anchored = de.anchored_concept(packs, concepts)
        overhead_anchored = (de.measure_overhead(world, packs, anchored, reps, guard_options=guard_options)
                             if anchored and anchored != concepts[0] else None)
        report = {"concepts": concepts, "irece_hyperparameters": hp, "cgce_hyperparameters": cgce_hp,
                  "guard_options": guard_options,
                  "cgce_anchor_texts": {c: p["cgce"].hyperparameters.get("anchor_text") for c, p in packs.items()},
                  "cgce_detection_head": args.cgce_detection_head,
                  "cgce_subphrases": {c: p["cgce"].concept.metadata.get("subphrases") for c, p in packs.items()},
                  "results": results, "overhead": overhead, "overhead_anchored": overhead_anchored,
                  "seconds": round(time.time() - t0, 1)}
        report["acceptance"] = de.acceptance(results, overhead, overhead_anchored)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = de.markdown(report)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out}/results.json and table.md in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
