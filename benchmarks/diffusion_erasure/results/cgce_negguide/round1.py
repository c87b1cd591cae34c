# ruff: noqa
"""Round 1 of CGCE negative guidance on the TUNING concepts; the rule is DECISION.md (committed first).

``python benchmarks/diffusion_erasure/results/cgce_negguide/round1.py [SEEDS] > round1.md`` (SEEDS default 100,200).
Protocol and measures: ``common.py``.
"""
from pathlib import Path

import numpy as np

from common import CONCEPTS, run_round
from benchmarks import diffusion_erasure as de
from erasekit.integrations.diffusers_calibrate import add_negative_embedding
from erasekit.testing.diffusion_world.scenes import _phrase, family_of

TEXTS = {"name": {c: None for c in CONCEPTS},
         "phrase": {c: _phrase({family_of(c): c}, np.random.default_rng(0), heldout=False, canonical=True)
                    for c in CONCEPTS}}


def make_packs(world, base_packs, hp):
    return {name: {c: de.with_hyperparameters(add_negative_embedding(world.pipe, p, tx[c]), **hp, negative_guidance=1)
                   for c, p in base_packs.items()} for name, tx in TEXTS.items()}


run_round(make_packs, Path(__file__).parent / "round1.json", texts=TEXTS)
