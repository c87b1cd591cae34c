# ruff: noqa
"""Does CGCE's refinement land on a sibling instead of "no value of the family" when the retain set always names one?

``PYTHONPATH=. python benchmarks/diffusion_erasure/results/cgce_diagnosis/sibling_retain.py CONCEPT[,..] OUT_PACKS``
calibrates a CGCE pack per concept exactly like the benchmark (300 training forget prompts, seed 1) but with
retain prompts that all name a sibling of the concept (the benchmark's retain set leaves the family
unnamed in ~25 % of prompts), saved as ``OUT_PACKS/{c}-cgce-v2-300`` so that
``python -m benchmarks.diffusion_erasure.diagnose_cgce --packs OUT_PACKS ...`` diagnoses it. An exploration
of the base-rate floor (diagnose_cgce's baseline.md), not a tuned setting.
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
        fam = W.family(c)
        specs = [s for s in W.retain_specs(c, 600, seed=1) if fam in s.asks][:300]
        concept = Concept(c, forget=W.train_prompts(c, 300, seed=1), retain=[s.prompt for s in specs], keywords=[c])
        pack = calibrate_cgce(W.pipe, concept)
        pack.save_pretrained(out / f"{c}-cgce-v2-300")
        print(c, {k: pack.hyperparameters[k] for k in ("C", "safe_logit", "unsafe_logit", "train_accuracy")}, flush=True)
