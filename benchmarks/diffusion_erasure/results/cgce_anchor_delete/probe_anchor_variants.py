# ruff: noqa
"""EXPLORATION (tuning concept checker only; not evidence for any decision): CGCE + anchor_text with other
anchor texts and refinement margins, at one base seed + 4 reseeds (12 prompts per attack).
Usage: ``PYTHONPATH=. python .../probe_anchor_variants.py SEED CONCEPT "TEXT1|TEXT2" [MARGIN1,MARGIN2]``
Prints: text, margin, survivals per attack, total, multi-concept other-family agreement, where images land.
"""
import collections, os, sys
REPO = __import__("pathlib").Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))
import numpy as np, torch
torch.set_num_threads(1)
from pathlib import Path
from benchmarks import diffusion_erasure as de
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.diffusers import guard
from erasekit.testing.diffusion_world import load_world
from _survivals import survivals  # this folder (the script's own directory is on sys.path)
SEED = int(sys.argv[1]); CONCEPT = sys.argv[2]; TEXTS = sys.argv[3].split("|")
N, RESEEDS = 12, 4
W = load_world(); W.pipe.set_progress_bar_config(disable=True)
hp = de.tuned_cgce_hyperparameters()
base = ConceptPack.from_pretrained(Path(REPO / f"bench_out/cgce-tune/packs/{CONCEPT}-cgce-v2-300"))
MARGINS = [float(m) for m in sys.argv[4].split(",")] if len(sys.argv) > 4 else [None]
for text, margin in [(t, m) for t in TEXTS for m in MARGINS]:
    h = {**hp, **({"margin": margin} if margin is not None else {})}
    pack = de.with_hyperparameters(base, **h, anchor_text=text) if text else de.with_hyperparameters(base, **h)
    tot, agree, land_all = survivals(W, pack, CONCEPT, SEED, N, RESEEDS)
    print(repr(text), margin, dict(tot), sum(tot.values()), round(agree, 3), dict(land_all), flush=True)
