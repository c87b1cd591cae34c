# ruff: noqa
"""Round 2 of CGCE negative guidance (gentler margins) on the TUNING concepts; the rule is DECISION.md (committed first).

``python benchmarks/diffusion_erasure/results/cgce_negguide/round2.py [SEEDS] > round2.md`` (SEEDS default 100,200).
Protocol and measures: ``common.py``.
"""
from pathlib import Path

import numpy as np

from common import CONCEPTS, run_round
from benchmarks import diffusion_erasure as de
from erasekit.integrations.diffusers_calibrate import add_negative_embedding


def make_packs(world, base_packs, hp):
    return {name: {c: de.with_hyperparameters(add_negative_embedding(world.pipe, p), **{**hp, "margin": margin},
                                              negative_guidance=1) for c, p in base_packs.items()}
            for name, margin in (("name_m1", 1.0), ("name_m15", 1.5))}


run_round(make_packs, Path(__file__).parent / "round2.json")
