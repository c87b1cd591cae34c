# ruff: noqa
"""EXPLORATION (tuning concept checker, seed 2100 + 4 reseeds; not evidence for any decision).

Does deleting the words the detector attends to (before appending the anchor text) lower survivals
beyond ``anchor_text`` alone? The deletion is emulated here by replacing the guard's ``_append`` (it
is called for flagged rows only): words whose tokens carry attention weight >= FRAC x the prompt's
largest weight (the detector's own concept-attention pooling: cos to the concept embedding / tau,
softmax over tokens, mean over concept rows) are removed, then the anchor text is appended.
Usage: ``PYTHONPATH=. python benchmarks/diffusion_erasure/results/cgce_anchor_delete/probe.py [SEED] [FRAC] [CONCEPT]``
"""
import collections, json, os, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from pathlib import Path
REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))
import numpy as np, torch
torch.set_num_threads(1)
from benchmarks import diffusion_erasure as de
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations import diffusers as ekd
from erasekit.integrations.diffusers import guard
from erasekit.testing.diffusion_world import load_world
from erasekit.testing.diffusion_world.pipeline import encode_text
from _survivals import survivals  # this folder (the script's own directory is on sys.path)

SEED = int(sys.argv[1]) if len(sys.argv) > 1 else 2100
FRAC = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
CONCEPT = sys.argv[3] if len(sys.argv) > 3 else "checker"
ANCHOR_TEXT, N, RESEEDS = " with a plain fill", 12, 4
W = load_world(); W.pipe.set_progress_bar_config(disable=True)
hp = de.tuned_cgce_hyperparameters()
base = ConceptPack.from_pretrained(REPO / f"bench_out/cgce-tune/packs/{CONCEPT}-cgce-v2-300")
pack = de.with_hyperparameters(base, **hp, anchor_text=ANCHOR_TEXT)
C = pack.tensors["concept_embedding"].float(); tau = float(pack.hyperparameters["tau"])
tok = W.pipe.tokenizer
deleted_log = []

def delete_words(prompt: str) -> str:
    e = encode_text(W.pipe, [prompt])[0]
    ue = e / (e.norm(dim=-1, keepdim=True) + 1e-6); uc = C / (C.norm(dim=-1, keepdim=True) + 1e-6)
    w = torch.softmax((ue @ uc.T) / tau, dim=0).mean(dim=1)  # T
    enc = tok(prompt, padding="max_length", max_length=e.shape[0], truncation=True)
    ids = enc.word_ids()
    real = [t for t, wid in enumerate(ids) if wid is not None]
    top = max(float(w[t]) for t in real)
    drop = {ids[t] for t in real if float(w[t]) >= FRAC * top}
    words = [(wid, enc.word_to_chars(wid)) for wid in sorted({ids[t] for t in real})]
    kept = [prompt[s:e_] for wid, (s, e_) in words if wid not in drop]
    out = " ".join(kept)
    deleted_log.append((prompt, out))
    return out

orig_append = ekd._append
def append_with_delete(prompt, texts):
    return orig_append(delete_words(prompt) if texts else prompt, texts)

res = {}
for arm in ("anchor_text", "anchor_text+delete"):
    ekd._append = append_with_delete if arm.endswith("delete") else orig_append
    tot, agree, land_all = survivals(W, pack, CONCEPT, SEED, N, RESEEDS)
    res[arm] = {"survivals": dict(tot), "total": sum(tot.values()), "other_agree": agree, "landed": dict(land_all)}
    print(arm, res[arm], flush=True)
ekd._append = orig_append
print("examples:", deleted_log[:12:2])
