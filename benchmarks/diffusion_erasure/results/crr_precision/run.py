# ruff: noqa
"""The adopted CGCE configuration (s13b) on 8 fresh draws per concept: direct and paraphrase CRR with
bootstrap intervals (README.md). Usage: ``PYTHONPATH=. python .../crr_precision/run.py [DRAWS]``.
Another run's packs: ``PACKS=bench_out/diffusion-erasure-s15/packs SUFFIX=-sub TAG=_s15`` (writes
``crr_precision_s15.{json,md}``). ``ANCHOR_TEXT_DTYPE=bfloat16``: the guard re-encodes anchored prompts in bf16
(the benchmark's setting since s16; default: the pipeline's own precision, as in the earlier files)."""
import json, os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from pathlib import Path
REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))
import numpy as np, torch
torch.set_num_threads(1)
from benchmarks import diffusion_erasure as de
from benchmarks.diffusion_world import NoGuard
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.diffusers import guard
from erasekit.testing.diffusion_world import load_world

DRAWS = int(sys.argv[1]) if len(sys.argv) > 1 else 8
PACKS = os.environ.get("PACKS", "bench_out/diffusion-erasure-s13b/packs")
SUFFIX, TAG = os.environ.get("SUFFIX", ""), os.environ.get("TAG", "")
ANCHOR_TEXT_DTYPE = os.environ.get("ANCHOR_TEXT_DTYPE") or None
N, ATTACKS = 12, ("direct", "paraphrase")
t0 = time.time()
with de.quiet_libraries():
    W = load_world(); W.pipe.set_progress_bar_config(disable=True)
    hp = de.tuned_cgce_hyperparameters()
    found: dict = {}
    for ci, c in enumerate(de.EVAL_CONCEPTS):
        pack = de.with_hyperparameters(ConceptPack.from_pretrained(REPO / PACKS / f"{c}-cgce-v2-300{SUFFIX}"), **hp)
        if (text := W.anchor_text(c)):
            pack = de.with_hyperparameters(pack, anchor_text=text)
        spec = {"direct": W.direct_specs, "paraphrase": W.heldout_specs}
        with guard(W.pipe, [pack], anchor_text_dtype=ANCHOR_TEXT_DTYPE) as g:
            for attack in ATTACKS:
                for arm in ("unguarded", "cgce"):
                    found[(c, attack, arm)] = []
                for k in range(1, DRAWS + 1):
                    seed = 1000 * ci + 100_000 * k
                    prompts = [s.prompt for s in spec[attack](c, N, seed)]
                    for arm, who in (("unguarded", NoGuard(W.pipe)), ("cgce", g)):
                        imgs = W.generate(prompts, seed, call=who, erase=[c])
                        found[(c, attack, arm)] += W.detector.finds(imgs, c, W.family(c)).int().tolist()
        print(c, {a: sum(found[(c, a, "cgce")]) for a in ATTACKS}, f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)

rng = np.random.default_rng(0)
def summary(attack, arm):
    per = {c: np.array(found[(c, attack, arm)]) for c in de.EVAL_CONCEPTS}
    boots = [np.mean([rng.choice(v, len(v)).mean() for v in per.values()]) for _ in range(2000)]
    return {"per_concept": {c: float(v.mean()) for c, v in per.items()}, "mean": float(np.mean([v.mean() for v in per.values()])),
            "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))], "n_per_concept": len(next(iter(per.values())))}
res = {"packs": f"{PACKS}/*-cgce-v2-300{SUFFIX}", "anchor_text_dtype": ANCHOR_TEXT_DTYPE, "draws": DRAWS, "prompts_per_draw": N, "hp": hp, "seconds": round(time.time() - t0, 1),
       "crr": {a: {arm: summary(a, arm) for arm in ("unguarded", "cgce")} for a in ATTACKS}}
out = Path(__file__).parent
(out / f"crr_precision{TAG}.json").write_text(json.dumps(res, indent=1) + "\n")
lines = [f"CRR % on {DRAWS} fresh draws x {N} prompts per concept (seed 1000 i + 100000 k), CGCE packs {PACKS}/*-cgce-v2-300{SUFFIX} with anchor text on styles"
         + (f" (re-encoded in {ANCHOR_TEXT_DTYPE})" if ANCHOR_TEXT_DTYPE else ""), "",
         "| attack | arm | " + " | ".join(de.EVAL_CONCEPTS) + " | mean | 95 % bootstrap |", "|---|---|" + "---|" * (len(de.EVAL_CONCEPTS) + 2)]
for a in ATTACKS:
    for arm in ("unguarded", "cgce"):
        s = res["crr"][a][arm]
        lines.append(f"| {a} | {arm} | " + " | ".join(f"{100 * s['per_concept'][c]:.1f}" for c in de.EVAL_CONCEPTS)
                     + f" | **{100 * s['mean']:.1f}** | {100 * s['ci95'][0]:.1f}-{100 * s['ci95'][1]:.1f} |")
(out / f"crr_precision{TAG}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
