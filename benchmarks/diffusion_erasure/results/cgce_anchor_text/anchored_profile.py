# ruff: noqa
"""Where the anchored flagged call's extra time goes (world, "dots" or CONCEPT, 4 flagged prompts, 1 thread; 25 paired calls,
the first 5 dropped): whole-call medians and the median ms of the guard's anchor re-encode, its refinement and
the text encoder's forward. Usage: ``PYTHONPATH=. python benchmarks/diffusion_erasure/results/cgce_anchor_text/anchored_profile.py [PACKS_DIR] [SUFFIX] [DTYPE] [CONCEPT]``
(default: the s15 run's packs, ``-sub``; DTYPE: the guard's ``anchor_text_dtype``, default the pipeline's own).
Writes ``anchored_profile.json`` (``anchored_profile_DTYPE.json`` with DTYPE, ``..._CONCEPT.json`` for another concept)
beside this file. ``_condition`` is the guard's whole conditioning work (detection, re-encode, refinement)."""
import sys, pathlib
import time, statistics, json, torch
PACKS = sys.argv[1] if len(sys.argv) > 1 else "bench_out/diffusion-erasure-s15/packs"
SUFFIX = sys.argv[2] if len(sys.argv) > 2 else "-sub"
DTYPE = sys.argv[3] if len(sys.argv) > 3 else None
CONCEPT = sys.argv[4] if len(sys.argv) > 4 else "dots"
torch.set_num_threads(1)
from benchmarks import diffusion_erasure as de
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations import diffusers as dmod
from erasekit.integrations.diffusers import guard, DiffusersGuard
from erasekit.testing.diffusion_world import load_world
T = {}
def wrap(obj, name, key):
    orig = getattr(obj, name)
    def f(*a, **k):
        t0 = time.perf_counter(); r = orig(*a, **k); T.setdefault(key, []).append(time.perf_counter() - t0); return r
    setattr(obj, name, f)
wrap(dmod, "refine", "refine")
wrap(DiffusersGuard, "_anchor_text", "anchor_text")
wrap(DiffusersGuard, "_condition", "_condition")
with de.quiet_libraries():
    w = load_world(); w.pipe.set_progress_bar_config(disable=True)
    te = w.pipe.text_encoder
    wrap_te_orig = te.forward
    def tef(*a, **k):
        t0 = time.perf_counter(); r = wrap_te_orig(*a, **k); T.setdefault("text_encoder_fwd", []).append(time.perf_counter() - t0); return r
    te.forward = tef
    pack = de.with_hyperparameters(ConceptPack.from_pretrained(f"{PACKS}/{CONCEPT}-cgce-v2-300{SUFFIX}"),
                                   **de.tuned_cgce_hyperparameters(), anchor_text=w.anchor_text(CONCEPT))
    flagged = w.direct_prompts(CONCEPT, 4, 3)
    g = guard(w.pipe, [pack], anchor_text_dtype=DTYPE)
    calls = {"base": [], "guard": []}
    for r in range(25):
        for k in ("base", "guard"):
            if r == 5 and k == "base": T.clear()
            t0 = time.perf_counter()
            w.generate(flagged, 0, call=None if k == "base" else g, **({} if k == "base" else {"erase": [CONCEPT]}))
            calls[k].append(time.perf_counter() - t0)
    g.detach()
med = {k: statistics.median(v[5:]) for k, v in calls.items()}
res = ({"call_median_s": med, "overhead": med["guard"] / med["base"] - 1,
                  "ms_median": {k: 1e3 * statistics.median(v) for k, v in T.items()},
                  "counts": {k: len(v) for k, v in T.items()}, "packs": f"{PACKS}/{CONCEPT}-cgce-v2-300{SUFFIX}", "anchor_text_dtype": DTYPE, "concept": CONCEPT})
name = "anchored_profile" + (f"_{DTYPE}" if DTYPE else "") + (f"_{CONCEPT}" if CONCEPT != "dots" else "")
(pathlib.Path(__file__).parent / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
print(json.dumps(res, indent=1))
