# ruff: noqa
"""The bf16 anchor round's protocol (README.md): checker with ``anchor_text``, the guard's re-encoding in the
pipeline's float32 vs ``anchor_text_dtype="bfloat16"``, seeds 2400/2500 + 4 reseeds.

Every image comes from ``erasekit.integrations.diffusers.guard``.
Usage: ``PYTHONPATH=. python benchmarks/diffusion_erasure/results/cgce_anchor_bf16/run.py [SEEDS] [OUT.json]``.
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
    arms = {f"anchor {name}": dtype for name, dtype in DTYPES.items()}
    fam = W.family(CONCEPT); names = W.concepts[fam]; others = tuple(f for f in ("shape", "colour", "style") if f != fam)
    spec_fn = {"direct": W.direct_specs, "paraphrase": W.heldout_specs, "multi_concept": W.multi_specs}
    rows = []
    for seed in SEEDS:
        benign = [s.prompt for s in W.benign_specs(CONCEPT, NB, seed)]
        unguarded_benign = W.generate(benign, seed)
        for arm, dtype in arms.items():
            with guard(W.pipe, [pack], anchor_text_dtype=dtype) as g:
                same = int(sum(np.array_equal(a, b) for a, b in
                               zip(W.generate(benign, seed, call=g, erase=[CONCEPT]), unguarded_benign)))
            rows.append({"arm": arm, "seed": seed, "attack": "benign", "bit_identical": same, "n": NB})
            for attack, fn in spec_fn.items():
                specs = fn(CONCEPT, N, seed); prompts = [s.prompt for s in specs]
                for k in range(RESEEDS + 1):
                    s_k = seed + 100_000 * k
                    with guard(W.pipe, [pack], anchor_text_dtype=dtype) as g:
                        imgs, anchored = [], 0
                        for j in range(0, len(prompts), 16):
                            imgs.append(W.generate(prompts[j:j + 16], s_k + j, call=g, erase=[CONCEPT]))
                            anchored += len(g.last_report.anchored.get(CONCEPT, []))
                        imgs = np.concatenate(imgs)
                    land = collections.Counter(names[i] for i in W.detector.probs(imgs)[fam].argmax(-1).tolist())
                    r = {"arm": arm, "seed": seed, "draw": k, "attack": attack, "n": N, "found": land[CONCEPT],
                         "landed": dict(land), "anchored": anchored}
                    if attack == "multi_concept":
                        r["other_agree"] = float(np.mean(list(W.agreement(specs, imgs, families=others).values())))
                    rows.append(r)
            print(f"seed {seed} {arm}: done", file=sys.stderr, flush=True)

def pooled(arm, seed=None):
    rs = [r for r in rows if r["arm"] == arm and (seed is None or r["seed"] == seed)]
    return {"survivals": sum(r.get("found", 0) for r in rs), "draws": sum(r["n"] for r in rs if r["attack"] != "benign"),
            "by_attack": {a: sum(r["found"] for r in rs if r["attack"] == a) for a in spec_fn},
            "other_agree": float(np.mean([r["other_agree"] for r in rs if r["attack"] == "multi_concept"])),
            "benign_bit_identical": sum(r["bit_identical"] for r in rs if r["attack"] == "benign"),
            "benign_n": sum(r["n"] for r in rs if r["attack"] == "benign"),
            "anchored_rows": sum(r.get("anchored", 0) for r in rs)}

P = {arm: {"all": pooled(arm), **{str(s): pooled(arm, s) for s in SEEDS}} for arm in arms}
print(f"checker, seeds {SEEDS} + {RESEEDS} reseeds each, {N} prompts per attack, cgce {hp}, anchor_text {ANCHOR_TEXT!r}, "
      f"anchor_text_dtype per arm\n")
print("| arm | seeds | survivals / draws | direct | paraphrase | multi_concept | multi other-family agree | benign bit-identical | rows anchored |")
print("|---|---|---|---|---|---|---|---|---|")
for arm in arms:
    for key in [*map(str, SEEDS), "all"]:
        p = P[arm][key]; a = p["by_attack"]
        print(f"| {arm} | {key} | {p['survivals']}/{p['draws']} | {a['direct']} | {a['paraphrase']} | {a['multi_concept']} | "
              f"{p['other_agree']:.3f} | {p['benign_bit_identical']}/{p['benign_n']} | {p['anchored_rows']} |")
print("\nWhere the guarded images land (style judged by the world detector, all draws):\n")
print("| arm | attack | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
for arm in arms:
    for attack in spec_fn:
        tot = collections.Counter()
        for r in rows:
            if r["arm"] == arm and r["attack"] == attack:
                tot.update(r["landed"])
        print(f"| {arm} | {attack} | " + " | ".join(str(tot[n]) for n in names) + " |")
OUT.write_text(json.dumps({"seeds": SEEDS, "anchor_text": ANCHOR_TEXT, "dtypes": DTYPES, "hp": hp, "rows": rows, "pooled": P},
                          indent=1) + "\n")
