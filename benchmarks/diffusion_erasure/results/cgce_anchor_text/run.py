# ruff: noqa
"""The anchor-text round's protocol (README.md): checker, CGCE alone vs CGCE + ``anchor_text``, seeds 2200/2300 + 4 reseeds.

Every image comes from ``erasekit.integrations.diffusers.guard``; the anchor text is the pack's
``anchor_text`` hyperparameter (the guard re-encodes flagged prompts), not edited prompts.
Usage: ``PYTHONPATH=. python benchmarks/diffusion_erasure/results/cgce_anchor_text/run.py [SEEDS] [OUT.json]``.
"""
import json, os, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from pathlib import Path
REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))
import torch
torch.set_num_threads(1)
from benchmarks import diffusion_erasure as de
from benchmarks.diffusion_erasure import anchor_protocol as protocol
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.diffusers import guard
from erasekit.testing.diffusion_world import load_world

CONCEPT, ANCHOR_TEXT, N, NB, RESEEDS = "checker", " with a plain fill", 12, 24, 4
SEEDS = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "2200,2300").split(",")]
OUT = Path(sys.argv[2] if len(sys.argv) > 2 else Path(__file__).with_name("checker.json"))

with de.quiet_libraries():
    W = load_world(); W.pipe.set_progress_bar_config(disable=True)
    hp = de.tuned_cgce_hyperparameters()
    base = ConceptPack.from_pretrained(REPO / f"bench_out/cgce-tune/packs/{CONCEPT}-cgce-v2-300")
    packs = {"cgce": de.with_hyperparameters(base, **hp), "cgce+anchor_text": de.with_hyperparameters(base, **hp, anchor_text=ANCHOR_TEXT)}
    arms = {arm: (lambda pack=pack: guard(W.pipe, [pack])) for arm, pack in packs.items()}
    rows = protocol.run_protocol(W, CONCEPT, arms, SEEDS, N, NB, RESEEDS)

P = protocol.pooled_by_arm(rows, list(arms), SEEDS)
print(f"checker, seeds {SEEDS} + {RESEEDS} reseeds each, {N} prompts per attack, cgce {hp}, anchor_text {ANCHOR_TEXT!r}\n")
print(protocol.markdown(rows, P, SEEDS, W.concepts[W.family(CONCEPT)]))
OUT.write_text(json.dumps({"seeds": SEEDS, "anchor_text": ANCHOR_TEXT, "hp": hp, "rows": rows, "pooled": P},
                          indent=1) + "\n")
