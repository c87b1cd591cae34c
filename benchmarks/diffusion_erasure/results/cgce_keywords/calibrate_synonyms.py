# ruff: noqa
"""CGCE packs calibrated exactly like the benchmark's but with ``keywords`` = the concept's training synonyms.

``PYTHONPATH=. python benchmarks/diffusion_erasure/results/cgce_keywords/calibrate_synonyms.py CONCEPT[,..] OUT_PACKS``
saves ``OUT_PACKS/{c}-cgce-v2-300`` (300 training forget / retain prompts, seed 1, as
``benchmarks.diffusion_erasure.calibrate_packs``) so that ``diagnose_cgce --packs OUT_PACKS`` reads them.
"""
import sys
from pathlib import Path

import torch

from benchmarks import diffusion_erasure as de
from erasekit.guardrails.concept import Concept
from erasekit.integrations.diffusers_calibrate import calibrate_cgce
from erasekit.testing.diffusion_world import load_world

torch.set_num_threads(1)
concepts, out = sys.argv[1].split(","), Path(sys.argv[2])
with de.quiet_libraries():
    W = load_world()
    for c in concepts:
        concept = Concept(c, forget=W.train_prompts(c, 300, seed=1), retain=W.retain_prompts(c, 300, seed=1),
                          keywords=W.train_synonyms(c))
        pack = calibrate_cgce(W.pipe, concept)
        pack.save_pretrained(out / f"{c}-cgce-v2-300")
        print(c, concept.keywords, {k: pack.hyperparameters[k] for k in ("C", "safe_logit", "unsafe_logit", "train_accuracy")}, flush=True)
