# ruff: noqa
"""The bf16 anchor round's protocol (README.md): checker with ``anchor_text``, the guard's re-encoding in the
pipeline's float32 vs ``anchor_text_dtype="bfloat16"``, seeds 2400/2500 + 4 reseeds.

Every image comes from ``erasekit.integrations.diffusers.guard``.
Usage: ``PYTHONPATH=. python benchmarks/diffusion_erasure/results/cgce_anchor_bf16/run.py [SEEDS] [OUT.json]``.
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
DTYPES = {"float32": None, "bfloat16": "bfloat16"}
SEEDS = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "2400,2500").split(",")]
OUT = Path(sys.argv[2] if len(sys.argv) > 2 else Path(__file__).with_name("checker.json"))

with de.quiet_libraries():
    W = load_world(); W.pipe.set_progress_bar_config(disable=True)
    hp = de.tuned_cgce_hyperparameters()
    base = ConceptPack.from_pretrained(REPO / f"bench_out/cgce-tune/packs/{CONCEPT}-cgce-v2-300")
    pack = de.with_hyperparameters(base, **hp, anchor_text=ANCHOR_TEXT)
    arms = {f"anchor {name}": (lambda dtype=dtype: guard(W.pipe, [pack], anchor_text_dtype=dtype))
            for name, dtype in DTYPES.items()}
    rows = protocol.run_protocol(W, CONCEPT, arms, SEEDS, N, NB, RESEEDS)

P = protocol.pooled_by_arm(rows, list(arms), SEEDS)
print(f"checker, seeds {SEEDS} + {RESEEDS} reseeds each, {N} prompts per attack, cgce {hp}, anchor_text {ANCHOR_TEXT!r}, "
      f"anchor_text_dtype per arm\n")
print(protocol.markdown(rows, P, SEEDS, W.concepts[W.family(CONCEPT)]))
OUT.write_text(json.dumps({"seeds": SEEDS, "anchor_text": ANCHOR_TEXT, "dtypes": DTYPES, "hp": hp, "rows": rows, "pooled": P},
                          indent=1) + "\n")
