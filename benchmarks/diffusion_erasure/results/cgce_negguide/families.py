# ruff: noqa
"""Exploration after rounds 1-2 (no decision rests on it): which OTHER families negative guidance damages on
multi-concept prompts of the TUNING concepts (seeds 100, 200 + 1000 per concept; 12 prompts each), per family,
off (margin 2) vs negative guidance (name text, margin 2).
``python benchmarks/diffusion_erasure/results/cgce_negguide/families.py > families.md``
"""
import os, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from pathlib import Path
REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))
import numpy as np, torch
torch.set_num_threads(1)
from benchmarks import diffusion_erasure as de
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.diffusers import guard
from erasekit.integrations.diffusers_calibrate import add_negative_embedding
from erasekit.testing.diffusion_world import load_world

CONCEPTS = ["square", "green", "checker"]
with de.quiet_libraries():
    W = load_world(); W.pipe.set_progress_bar_config(disable=True)
    hp = de.tuned_cgce_hyperparameters()
    base = {c: ConceptPack.from_pretrained(REPO / f"bench_out/cgce-tune/packs/{c}-cgce-v2-300") for c in CONCEPTS}
    packs = {"off": {c: de.with_hyperparameters(p, **hp) for c, p in base.items()},
             "name": {c: de.with_hyperparameters(add_negative_embedding(W.pipe, p), **hp, negative_guidance=1)
                      for c, p in base.items()}}
    print("| concept | other family | prompts asking it | unguarded | off | negative guidance |\n|---|---|---|---|---|---|")
    for i, c in enumerate(CONCEPTS):
        fam = W.family(c); others = tuple(f for f in ("shape", "colour", "style") if f != fam)
        specs, imgs = [], {"unguarded": [], "off": [], "name": []}
        for s0 in (100, 200):
            seed = s0 + 1000 * i
            sp = W.multi_specs(c, 12, seed); specs += sp; prompts = [s.prompt for s in sp]
            imgs["unguarded"].append(W.generate(prompts, seed))
            for k in ("off", "name"):
                with guard(W.pipe, [packs[k][c]]) as g:
                    imgs[k].append(W.generate(prompts, seed, call=g, erase=[c]))
        acc = {k: W.agreement(specs, np.concatenate(v), families=others) for k, v in imgs.items()}
        for f in others:
            n = sum(f in s.asks for s in specs)
            print(f"| {c} | {f} | {n} | " + " | ".join(f"{acc[k].get(f, float('nan')):.3f}" for k in ("unguarded", "off", "name")) + " |")
