# ruff: noqa
"""Utility side of the CGCE anchor decision (README.md, rules 2 and 3), and where the refined images land.

``PYTHONPATH=. python benchmarks/diffusion_erasure/results/cgce_anchor/accuracy.py CONCEPT ANCHOR PACKS SEED OUT.json``

For ``CONCEPT`` guarded with its plain pack (``PACKS/{c}-cgce-v2-300``) and with the anchored one
(``PACKS/{c}-cgce-v2-300-anchor-{ANCHOR}``, as diagnose_cgce --anchor writes it), hyperparameters of
cgce_tuned.json, at ``SEED`` and 4 reseeds (SEED + 100000 k, as diagnose_cgce): other-family agreement on
multi_concept images, full agreement on benign sibling-named images, and the concept family's
predicted value on guarded direct / paraphrase / multi_concept images (how many land on the anchor).
"""
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from benchmarks import diffusion_erasure as de
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.diffusers import guard
from erasekit.testing.diffusion_world import load_world

torch.set_num_threads(1)
c, anchor, packs_dir, seed, out = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
N, RESEEDS = 12, 4
hp = de.tuned_cgce_hyperparameters()
with de.quiet_libraries():
    W = load_world()
    W.pipe.set_progress_bar_config(disable=True)
    fam = W.family(c)
    others = tuple(f for f in ("shape", "colour", "style") if f != fam)
    packs = {"plain": de.with_hyperparameters(ConceptPack.from_pretrained(packs_dir / f"{c}-cgce-v2-300"), **hp),
             "anchor": de.with_hyperparameters(
                 ConceptPack.from_pretrained(packs_dir / f"{c}-cgce-v2-300-anchor-{anchor}"), **hp)}
    specs = {"direct": W.direct_specs(c, N, seed), "paraphrase": W.heldout_specs(c, N, seed),
             "multi_concept": W.multi_specs(c, N, seed), "benign": W.benign_specs(c, N, seed)}
    seeds = [seed] + [seed + 100_000 * (k + 1) for k in range(RESEEDS)]
    res: dict = {"concept": c, "anchor": anchor, "seed": seed, "seeds": seeds, "hyperparameters": hp,
                 "command": "PYTHONPATH=. python benchmarks/diffusion_erasure/results/cgce_anchor/accuracy.py "
                 + " ".join(sys.argv[1:])}
    for arm in ("unguarded", "plain", "anchor"):
        r = {"multi_other_family_agreement": [], "benign_full_agreement": [], "landed": {}}
        for s in seeds:
            for attack, sp in specs.items():
                prompts = [x.prompt for x in sp]
                if arm == "unguarded":
                    imgs = W.generate(prompts, s)
                else:
                    with guard(W.pipe, [packs[arm]]) as g:
                        imgs = W.generate(prompts, s, call=g, erase=[c])
                if attack == "multi_concept":
                    r["multi_other_family_agreement"].append(float(np.mean(list(W.agreement(sp, imgs, others).values()))))
                if attack == "benign":
                    agree = W.agreement(sp, imgs)
                    r["benign_full_agreement"].append(float(np.mean(list(agree.values()))))
                else:
                    pred = W.detector(imgs)[fam]
                    r["landed"].setdefault(attack, Counter()).update(pred)
        r["multi_other_family_agreement_mean"] = float(np.mean(r["multi_other_family_agreement"]))
        r["benign_full_agreement_mean"] = float(np.mean(r["benign_full_agreement"]))
        r["landed"] = {a: dict(v) for a, v in r["landed"].items()}
        res[arm] = r
        print(arm, {k: v for k, v in r.items() if k.endswith("_mean") or k == "landed"}, flush=True)
    for arm in ("plain", "anchor"):
        res[arm]["multi_ratio_vs_unguarded"] = res[arm]["multi_other_family_agreement_mean"] / res["unguarded"]["multi_other_family_agreement_mean"]
        res[arm]["benign_ratio_vs_unguarded"] = res[arm]["benign_full_agreement_mean"] / res["unguarded"]["benign_full_agreement_mean"]
        print(arm, "multi ratio", round(res[arm]["multi_ratio_vs_unguarded"], 4), "benign ratio",
              round(res[arm]["benign_ratio_vs_unguarded"], 4))
    out.write_text(json.dumps(res, indent=1) + "\n")
