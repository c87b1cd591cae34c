"""The anchor studies' protocol on one concept (``results/cgce_anchor_text/``, ``results/cgce_anchor_bf16/``).

Each arm is a guard factory. Per base seed: benign prompts (bit-identical to unguarded?), then direct,
paraphrase and multi-concept prompts drawn at the seed and ``reseeds`` more (``seed + 100000 k``), judged
by the world detector: how many images still show the concept, where the rest land, and the
multi-concept images' agreement on the other families.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from erasekit.testing.diffusion_world import World

ATTACKS = ("direct", "paraphrase", "multi_concept")


def run_protocol(world: World, concept: str, arms: dict[str, Callable[[], Any]], seeds: list[int],
                 n: int = 12, n_benign: int = 24, reseeds: int = 4) -> list[dict[str, Any]]:
    """One row per (arm, seed, attack, draw), plus a benign row per (arm, seed)."""
    fam = world.family(concept)
    names = world.concepts[fam]
    others = tuple(f for f in ("shape", "colour", "style") if f != fam)
    spec_fn = {"direct": world.direct_specs, "paraphrase": world.heldout_specs, "multi_concept": world.multi_specs}
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        benign = [s.prompt for s in world.benign_specs(concept, n_benign, seed)]
        unguarded_benign = world.generate(benign, seed)
        for arm, make_guard in arms.items():
            with make_guard() as g:
                guarded = world.generate(benign, seed, call=g, erase=[concept])
                same = int(sum(np.array_equal(a, b) for a, b in zip(guarded, unguarded_benign, strict=True)))
            rows.append({"arm": arm, "seed": seed, "attack": "benign", "bit_identical": same, "n": n_benign})
            for attack in ATTACKS:
                specs = spec_fn[attack](concept, n, seed)
                prompts = [s.prompt for s in specs]
                for k in range(reseeds + 1):
                    s_k = seed + 100_000 * k
                    with make_guard() as g:
                        imgs, anchored = [], 0
                        for j in range(0, len(prompts), 16):
                            imgs.append(world.generate(prompts[j:j + 16], s_k + j, call=g, erase=[concept]))
                            anchored += len(g.last_report.anchored.get(concept, []))
                        images = np.concatenate(imgs)
                    land = collections.Counter(names[i] for i in world.detector.probs(images)[fam].argmax(-1).tolist())
                    row = {"arm": arm, "seed": seed, "draw": k, "attack": attack, "n": n, "found": land[concept],
                           "landed": dict(land), "anchored": anchored}
                    if attack == "multi_concept":
                        row["other_agree"] = float(np.mean(list(world.agreement(specs, images, families=others).values())))
                    rows.append(row)
            print(f"seed {seed} {arm}: done", file=sys.stderr, flush=True)
    return rows


def pooled(rows: list[dict[str, Any]], arm: str, seed: int | None = None) -> dict[str, Any]:
    """An arm's totals over all seeds, or over one."""
    rs = [r for r in rows if r["arm"] == arm and (seed is None or r["seed"] == seed)]
    return {"survivals": sum(r.get("found", 0) for r in rs), "draws": sum(r["n"] for r in rs if r["attack"] != "benign"),
            "by_attack": {a: sum(r["found"] for r in rs if r["attack"] == a) for a in ATTACKS},
            "other_agree": float(np.mean([r["other_agree"] for r in rs if r["attack"] == "multi_concept"])),
            "benign_bit_identical": sum(r["bit_identical"] for r in rs if r["attack"] == "benign"),
            "benign_n": sum(r["n"] for r in rs if r["attack"] == "benign"),
            "anchored_rows": sum(r.get("anchored", 0) for r in rs)}


def pooled_by_arm(rows: list[dict[str, Any]], arms: list[str], seeds: list[int]) -> dict[str, dict[str, Any]]:
    """``{arm: {"all": ..., "<seed>": ...}}``."""
    return {arm: {"all": pooled(rows, arm), **{str(s): pooled(rows, arm, s) for s in seeds}} for arm in arms}


def markdown(rows: list[dict[str, Any]], pooled_arms: dict[str, dict[str, Any]], seeds: list[int],
             names: list[str]) -> str:
    """The survivals table and where the guarded images land (``names``: the concept family's values)."""
    lines = ["| arm | seeds | survivals / draws | direct | paraphrase | multi_concept | multi other-family agree | "
             "benign bit-identical | rows anchored |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, by_key in pooled_arms.items():
        for key in [*map(str, seeds), "all"]:
            p = by_key[key]
            a = p["by_attack"]
            lines.append(f"| {arm} | {key} | {p['survivals']}/{p['draws']} | {a['direct']} | {a['paraphrase']} | "
                         f"{a['multi_concept']} | {p['other_agree']:.3f} | {p['benign_bit_identical']}/{p['benign_n']} | "
                         f"{p['anchored_rows']} |")
    lines += ["\nWhere the guarded images land (style judged by the world detector, all draws):\n",
              "| arm | attack | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names)]
    for arm in pooled_arms:
        for attack in ATTACKS:
            tot: collections.Counter = collections.Counter()
            for r in rows:
                if r["arm"] == arm and r["attack"] == attack:
                    tot.update(r["landed"])
            lines.append(f"| {arm} | {attack} | " + " | ".join(str(tot[n]) for n in names) + " |")
    return "\n".join(lines)
