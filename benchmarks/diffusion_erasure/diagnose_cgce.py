"""Per-image diagnosis of CGCE's surviving images: detection miss, guidance failure, or the world's base rate.

``python -m benchmarks.diffusion_erasure.diagnose_cgce --packs bench_out/diffusion-erasure-s10/packs
[--concepts circle,star,...] [--attacks direct,paraphrase] [--n 12] [--base-rate 48] [--out FILE.json]``

For every image of the benchmark's prompt attacks (same prompts, same seeds as
``python -m benchmarks.diffusion_erasure``: concept ``i`` of the evaluated list uses seed ``1000 * i``)
it records, next to what the judge (the world's detector) saw unguarded and guarded:

* ``score``: the concept classifier's P(concept) on the prompt's conditioning (ONNX), and ``flagged``;
* for flagged prompts: the refinement run on that row alone (the guard refines rows independently,
  checked against the batch refinement): Gauss-Newton ``steps``, initial / final / target logit, and how
  far the conditioning moved (``moved``: |E' - E| / |E|);
* ``judge``: the detector's prediction in the concept's family and its probability for the concept.

Each surviving guarded image is then classed as ``miss`` (never flagged), ``guidance`` (flagged and
refined, the concept still drawn) and, separately, the concept's **base rate**: how often the world
draws the concept for prompts that never mention its family (``--base-rate`` retain prompts with no
value of the family, other seeds) and for benign prompts naming a sibling. A refined prompt that only
loses the concept cannot go under the first rate unless guidance steers to another value of the family.

Packs are read from ``--packs`` (the benchmark's cache folder, ``{concept}-cgce-v2-{N}``) with the
hyperparameters of ``cgce_tuned.json`` (or ``--set key=value``); nothing is calibrated here unless a
pack is missing (then it is calibrated like the benchmark does, on training prompts only).
``--anchor checker=plain`` diagnoses packs with a CGCE anchor instead (``{concept}-cgce-v2-{N}-anchor-{anchor}``,
calibrated with :func:`benchmarks.diffusion_erasure.anchor_concept`); refinement then pulls flagged rows
onto the anchor as the guard does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _packs(world: Any, concepts: list[str], packs_dir: Path, n_prompts: int, hp: dict[str, Any],
           anchors: dict[str, str] | None = None) -> dict[str, Any]:
    from benchmarks import diffusion_erasure as de
    from erasekit.guardrails.concept import Concept
    from erasekit.guardrails.pack import ConceptPack
    from erasekit.integrations.diffusers_calibrate import add_negative_embedding, calibrate_cgce

    out = {}
    for c in concepts:
        anchor = (anchors or {}).get(c)
        path = packs_dir / (f"{c}-cgce-v2-{n_prompts}" + (f"-anchor-{anchor}" if anchor else ""))
        if path.is_dir():
            pack = ConceptPack.from_pretrained(path)
        else:
            concept = Concept(c, forget=world.train_prompts(c, n_prompts, seed=1),
                              retain=world.retain_prompts(c, n_prompts, seed=1), keywords=[c])
            pack = calibrate_cgce(world.pipe, concept,
                                  anchor=de.anchor_concept(world, c, anchor, n_prompts) if anchor else None)
            pack.save_pretrained(path)
        if hp.get("negative_guidance") and "negative_embedding" not in pack.tensors:
            pack = add_negative_embedding(world.pipe, pack)  # packs cached before the tensor existed
        out[c] = de.with_hyperparameters(pack, **hp) if hp else pack
    return out


def _refine_args(clf: Any) -> tuple[list[Any], dict[str, Any]]:
    """``refine``'s twins and settings for one classifier, as the guard builds them (its anchor after it)."""
    if clf.anchor_twin is None:
        return [clf.twin], {"etas": [clf.eta], "max_steps": clf.max_steps, "target_logits": [clf.target_logit]}
    return [clf.twin, clf.anchor_twin], {"etas": [clf.eta] * 2, "max_steps": clf.max_steps, "anchors": [False, True],
                                         "target_logits": [clf.target_logit, clf.anchor_target_logit]}


def refine_rows(clf: Any, embeds: torch.Tensor) -> list[dict[str, Any]]:
    """Detection and per-row refinement of conditioning ``[N, T, D]`` exactly as the guard does it."""
    from erasekit.classifiers.twin import refine

    twins, kwargs = _refine_args(clf)
    scores = clf.scores(embeds)
    rows = []
    for i in range(len(embeds)):
        e = embeds[i:i + 1]
        flagged = bool(scores[i] > clf.threshold)
        row: dict[str, Any] = {"score": float(scores[i]), "flagged": flagged,
                               "logit": float(clf.twin.logits(e)[0]), "target_logit": clf.target_logit}
        if flagged:
            r = refine(e, twins, torch.tensor([[True]] * len(twins)), **kwargs)
            row.update(steps=int(r.steps), final_logit=float(clf.twin.logits(r.embeds)[0]),
                       moved=float((r.embeds - e).norm() / e.norm()),
                       reached_target=bool(float(clf.twin.logits(r.embeds)[0]) <= clf.target_logit + 1e-4))
            if clf.anchor_twin is not None:
                row.update(anchor_logit=float(clf.anchor_twin.logits(e)[0]),
                           anchor_final_logit=float(clf.anchor_twin.logits(r.embeds)[0]),
                           anchor_target_logit=clf.anchor_target_logit)
            row["_refined"] = r.embeds
        rows.append(row)
    return rows


def _judge(world: Any, images: np.ndarray, concept: str) -> tuple[list[str], list[float]]:
    fam = world.family(concept)
    probs = world.detector.probs(images)[fam]
    names = world.concepts[fam]
    return [names[i] for i in probs.argmax(-1).tolist()], probs[:, names.index(concept)].tolist()


def diagnose_concept(world: Any, pack: Any, concept: str, seed: int, attacks: list[str], n: int,
                     reseeds: int = 0) -> list[dict[str, Any]]:
    from erasekit.classifiers.cgce import CGCEClassifier
    from erasekit.classifiers.twin import refine
    from erasekit.integrations.diffusers import guard
    from erasekit.integrations.diffusers_calibrate import encode_conditioning

    clf = CGCEClassifier.from_pack(pack)
    spec_fn = {"direct": world.direct_specs, "paraphrase": world.heldout_specs,
               "rare_synonym": world.rare_synonym_specs, "multi_concept": world.multi_specs}
    out = []
    for attack in attacks:
        prompts = [s.prompt for s in spec_fn[attack](concept, n, seed)]
        embeds = encode_conditioning(world.pipe, prompts)
        rows = refine_rows(clf, embeds)
        flagged = torch.tensor([r["flagged"] for r in rows])
        if bool(flagged.any()):  # the guard refines the whole batch at once: rows must not interact
            twins, kwargs = _refine_args(clf)
            batch = refine(embeds, twins, flagged[None].expand(len(twins), -1), **kwargs).embeds
            per_row = torch.cat([r.get("_refined", embeds[i:i + 1]) for i, r in enumerate(rows)])
            gap = float((batch - per_row).abs().max())
            if gap > 1e-4:
                raise AssertionError(f"per-row refinement differs from the batch refinement by {gap}")
        base = world.generate(prompts, seed)
        with guard(world.pipe, [pack]) as g:
            guarded = world.generate(prompts, seed, call=g, erase=[concept])
        pred_b, p_b = _judge(world, base, concept)
        pred_g, p_g = _judge(world, guarded, concept)
        # Same prompts, other seeds: is survival a property of the prompt (its refined conditioning
        # still asks for the concept) or of the seed (the world's draw for a concept-free request)?
        again_b, again_g = np.zeros(n), np.zeros(n)
        for k in range(reseeds):
            s_k = seed + 100_000 * (k + 1)
            again_b += np.array(_judge(world, world.generate(prompts, s_k), concept)[0]) == concept
            with guard(world.pipe, [pack]) as g:
                again_g += np.array(_judge(world, world.generate(prompts, s_k, call=g, erase=[concept]), concept)[0]) == concept
        for i, r in enumerate(rows):
            r.pop("_refined", None)
            survived = pred_g[i] == concept
            r.update(concept=concept, attack=attack, index=i, prompt=prompts[i],
                     judge_unguarded=pred_b[i], p_unguarded=p_b[i], judge_guarded=pred_g[i], p_guarded=p_g[i],
                     survived=survived,
                     **({"reseed_rate_unguarded": float(again_b[i] / reseeds),
                         "reseed_rate_guarded": float(again_g[i] / reseeds)} if reseeds else {}),
                     failure=None if not survived else ("guidance" if r["flagged"] else "miss"))
            out.append(r)
    return out


def base_rates(world: Any, concept: str, n: int, seed: int) -> dict[str, Any]:
    """How often the world draws ``concept`` unasked: family never mentioned, or a sibling named."""
    fam = world.family(concept)
    free = []
    k = 0
    while len(free) < n:  # retain prompts that name no value of the concept's family
        specs = world.retain_specs(concept, 4 * n, seed + k)
        free += [s for s in specs if fam not in s.asks]
        k += 1
    free = free[:n]
    sib = world.benign_specs(concept, n, seed + 1)
    rates = {}
    for name, specs in (("family_unmentioned", free), ("sibling_named", sib)):
        imgs = world.generate([s.prompt for s in specs], seed)
        pred, _ = _judge(world, imgs, concept)
        rates[name] = {"rate": float(np.mean([p == concept for p in pred])), "n": len(specs),
                       "examples": [s.prompt for s in specs[:3]]}
    return rates


def summarise(rows: list[dict[str, Any]], rates: dict[str, Any]) -> str:
    lines = ["| concept | attack | unguarded CRR | guarded CRR | flagged | survived: miss | survived: guidance "
             "| base rate (family unmentioned / sibling named) |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["concept"], r["attack"]) for r in rows}, key=lambda k: (list(rates).index(k[0]), k[1]))
    for c, a in keys:
        rs = [r for r in rows if r["concept"] == c and r["attack"] == a]
        n = len(rs)
        un = sum(r["judge_unguarded"] == c for r in rs)
        lines.append(f"| {c} | {a} | {un}/{n} | {sum(r['survived'] for r in rs)}/{n} | {sum(r['flagged'] for r in rs)}/{n} "
                     f"| {sum(r['failure'] == 'miss' for r in rs)} | {sum(r['failure'] == 'guidance' for r in rs)} "
                     f"| {100 * rates[c]['family_unmentioned']['rate']:.0f} % / {100 * rates[c]['sibling_named']['rate']:.0f} % |")
    reseeded = "reseed_rate_guarded" in rows[0]
    if reseeded:
        lines += ["", "Other seeds, same prompts (mean share of seeds showing the concept): guarded, over the prompts "
                  "that survived at the benchmark's seed / that did not; flagged prompts only and unflagged only:", "",
                  "| concept | attack | survivors | non-survivors | flagged prompts | unflagged prompts |",
                  "|---|---|---|---|---|---|"]
        m = lambda rs: "–" if not rs else f"{100 * np.mean([r['reseed_rate_guarded'] for r in rs]):.0f} % ({len(rs)})"  # noqa: E731
        for c, a in keys:
            rs = [r for r in rows if r["concept"] == c and r["attack"] == a]
            lines.append(f"| {c} | {a} | {m([r for r in rs if r['survived']])} | {m([r for r in rs if not r['survived']])} "
                         f"| {m([r for r in rs if r['flagged']])} | {m([r for r in rs if not r['flagged']])} |")
    lines += ["", "Surviving images:", "", "| concept | attack | # | prompt | score | steps | logit → final (target) "
              "| moved | unguarded judge |" + (" other seeds: unguarded / guarded |" if reseeded else ""),
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if reseeded else "")]
    for r in rows:
        if r["survived"]:
            ref = (f"{r['steps']} | {r['logit']:.2f} → {r['final_logit']:.2f} ({r['target_logit']:.2f}) | {r['moved']:.2f}"
                   if r["flagged"] else f"– | {r['logit']:.2f} | –")
            extra = (f" {100 * r['reseed_rate_unguarded']:.0f} % / {100 * r['reseed_rate_guarded']:.0f} % |"
                     if reseeded else "")
            lines.append(f"| {r['concept']} | {r['attack']} | {r['index']} | {r['prompt']} | {r['score']:.3f} | {ref} "
                         f"| {r['judge_unguarded']} |{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks import diffusion_erasure as de
    from erasekit.testing.diffusion_world import load_world

    p = argparse.ArgumentParser(prog="python -m benchmarks.diffusion_erasure.diagnose_cgce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--packs", default="bench_out/diffusion-erasure-s10/packs")
    p.add_argument("--calibration-prompts", type=int, default=300)
    p.add_argument("--concepts", default=",".join(de.EVAL_CONCEPTS))
    p.add_argument("--seed-order", default=None,
                   help="concept i of this list gets seed SEED+1000*i (default: --concepts, the benchmark's order)")
    p.add_argument("--seed", type=int, default=0, help="base seed (the benchmark's is 0; tuning runs use 100)")
    p.add_argument("--attacks", default="direct,paraphrase")
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--base-rate", type=int, default=48, help="prompts per base-rate cell (seed 7000+)")
    p.add_argument("--reseeds", type=int, default=0,
                   help="also draw every prompt with this many other seeds (guarded and unguarded)")
    p.add_argument("--set", action="append", default=[], help="override a CGCE hyperparameter, KEY=VALUE")
    p.add_argument("--anchor", default=None,
                   help="CONCEPT=ANCHOR[,...]: calibrate/load these concepts' packs with a CGCE anchor (e.g. checker=plain)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write rows and base rates as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hp = de.tuned_cgce_hyperparameters()
    for kv in args.set:
        k, v = kv.split("=", 1)
        hp[k] = json.loads(v)
    concepts = args.concepts.split(",")
    order = args.seed_order.split(",") if args.seed_order else concepts
    items = args.anchor.split(",") if args.anchor else []
    if any(kv.count("=") != 1 or not all(kv.split("=")) for kv in items):
        p.error(f"--anchor expects CONCEPT=ANCHOR[,CONCEPT=ANCHOR...], e.g. checker=plain; got {args.anchor!r}")
    anchors = dict(kv.split("=", 1) for kv in items) or None
    with de.quiet_libraries():
        world = load_world()
        world.pipe.set_progress_bar_config(disable=True)
        packs = _packs(world, concepts, Path(args.packs), args.calibration_prompts, hp, anchors)
        rows, rates = [], {}
        for c in concepts:
            seed = args.seed + 1000 * order.index(c)
            rows += diagnose_concept(world, packs[c], c, seed, args.attacks.split(","), args.n, args.reseeds)
            rates[c] = base_rates(world, c, args.base_rate, 7000 + seed)
            print(f"{c}: done", file=sys.stderr, flush=True)
    table = summarise(rows, rates)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"hyperparameters": hp, "command": "python -m "
                                              "benchmarks.diffusion_erasure.diagnose_cgce " + " ".join(argv or sys.argv[1:]),
                                              "rows": rows, "base_rates": rates}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
