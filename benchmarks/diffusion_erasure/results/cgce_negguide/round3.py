# ruff: noqa
"""Round 3 of CGCE negative guidance (negative_source: refinement, u + (E - E')) on the TUNING concepts; the rule is DECISION.md (committed first).

``python benchmarks/diffusion_erasure/results/cgce_negguide/round3.py [SEEDS] > round3.md`` (SEEDS default 100,200).
Protocol and measures: ``common.py``.
"""
from pathlib import Path

import numpy as np

from common import CONCEPTS, run_round
from benchmarks import diffusion_erasure as de


def make_packs(world, base_packs, hp):
    return {"refinement": {c: de.with_hyperparameters(p, **hp, negative_guidance=1, negative_source="refinement")
                           for c, p in base_packs.items()}}


run_round(make_packs, Path(__file__).parent / "round3.json")
