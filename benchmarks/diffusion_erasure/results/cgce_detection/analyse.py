# ruff: noqa
"""Summaries from res_*.json: recall@0.5 and recall at the lowest threshold with 0 benign FP and
ret2 FP <= baseline's (per concept, a diagnostic using eval negatives), plus failing paraphrases."""
import sys, json, numpy as np
D = "bench_out/cgce-detection"
base = json.load(open(f"{D}/res_base.json"))
def thr_recall(r, c):
    s = r["scores"]; ben, ret2 = np.array(s["ben"]), np.sort(np.array(s["ret2"]))[::-1]
    k = base[c]["ret2_fp"]
    t = max(ben.max(), ret2[k] if k < len(ret2) else 0, 0.0)  # strictly above t passes
    return float((np.array(s["para"]) > t).mean()), float((np.array(s["multi"]) > t).mean())
for name in sys.argv[1].split(","):
    r = json.load(open(f"{D}/res_{name}.json"))
    tr = {c: thr_recall(v, c) for c, v in r.items()}
    print(f"{name:14s} recall@t*: mean={np.mean([x[0] for x in tr.values()]):.3f} multimin={min(x[1] for x in tr.values()):.2f} "
          + " ".join(f"{c[:4]}={x[0]:.2f}" for c, x in tr.items()))
if len(sys.argv) > 2:
    r = json.load(open(f"{D}/res_{sys.argv[2]}.json"))
    for c in sys.argv[3].split(","):
        P = json.load(open(f"{D}/cache/{c}_prompts.json"))
        s = np.array(r[c]["scores"]["para"])
        print(c, "median", np.median(s), "max ben", max(r[c]["scores"]["ben"]))
        for p, v in sorted(zip(P["para"], s), key=lambda t: t[1])[:48:3]: print(f"   {v:.3f} {p}")
