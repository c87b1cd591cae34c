# ruff: noqa
"""Apply README.md's pre-registered rule to variants.py's results: round 1 on seed sets s4-s6 (writes
DECISION.md), ``--round 2`` on s7-s9 with rule 4 at the 48-prompt resolution (writes DECISION_round2.md)."""
import json, sys
from pathlib import Path
import numpy as np
ROUND = int(sys.argv[sys.argv.index("--round") + 1]) if "--round" in sys.argv else 1
D = Path("bench_out/cgce-detection"); BASE, CAND = "base", "tau05_syn_noflat"
SETS = ("_s4", "_s5", "_s6") if ROUND == 1 else ("_s7", "_s8", "_s9")
MULTI_SLACK = 0.02 if ROUND == 1 else 1 / 48
R = {(v, s): json.loads((D / f"res_{v}{s}.json").read_text()) for v in (BASE, CAND) for s in SETS}
def stats(v, s):
    r = R[(v, s)]
    return dict(para=float(np.mean([x["para"] for x in r.values()])), ben=sum(x["ben_fp"] for x in r.values()),
                ret=sum(x["ret2_fp"] for x in r.values()), multi=min(x["multi"] for x in r.values()),
                per=[round(r[c]["para"], 2) for c in r])
S = {(v, s): stats(v, s) for v, s in R}
pooled = {v: float(np.mean([x["para"] for s in SETS for x in R[(v, s)].values()])) for v in (BASE, CAND)}
rules = {
    "1 pooled recall >= base + 0.05, never below base on a set":
        pooled[CAND] >= pooled[BASE] + 0.05 - 1e-9 and all(S[(CAND, s)]["para"] >= S[(BASE, s)]["para"] for s in SETS),
    "2 benign FP <= base on every set": all(S[(CAND, s)]["ben"] <= S[(BASE, s)]["ben"] for s in SETS),
    "3 fresh-retain FP summed <= base + 3": sum(S[(CAND, s)]["ret"] for s in SETS) <= sum(S[(BASE, s)]["ret"] for s in SETS) + 3,
    f"4 lowest multi recall >= base - {'0.02' if ROUND == 1 else '1/48'} on every set":
        all(S[(CAND, s)]["multi"] >= S[(BASE, s)]["multi"] - MULTI_SLACK - 1e-9 for s in SETS),
}
concepts = list(R[(BASE, SETS[0])])
lines = [f"# Decision{'' if ROUND == 1 else ', round 2'}: detection-only CGCE head (rule in README.md)", "",
         "| arm | set | paraphrase recall | benign FP / 960 | fresh-retain FP / 3000 | lowest multi recall | per concept (" + ", ".join(concepts) + ") |",
         "|---|---|---|---|---|---|---|"]
for v in (BASE, CAND):
    for s in SETS:
        x = S[(v, s)]
        lines.append(f"| {v} | {s[1:]} | {x['para']:.3f} | {x['ben']} | {x['ret']} | {x['multi']:.4f} ({round(x['multi'] * 48)}/48) | {' '.join(map(str, x['per']))} |")
lines += ["", f"Pooled paraphrase recall over 30 concept-sets: base {pooled[BASE]:.3f}, candidate {pooled[CAND]:.3f} "
          f"(gain {pooled[CAND] - pooled[BASE]:+.3f}).", ""]
lines += [f"- rule {k}: **{'holds' if ok else 'fails'}**" for k, ok in rules.items()]
verdict = all(rules.values())
lines += ["", f"**Verdict: {'adopt' if verdict else 'do not adopt'}.**"]
text = "\n".join(lines) + "\n"
print(text)
Path(__file__).with_name("DECISION.md" if ROUND == 1 else "DECISION_round2.md").write_text(text)
sys.exit(0)
