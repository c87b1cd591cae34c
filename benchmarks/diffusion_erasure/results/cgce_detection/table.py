# ruff: noqa
"""Table over the three fixed evaluations (seed set 1 = cal 1/eval 7 [the fixed one], 2 = cal 2/eval 8, 3 = cal 3/eval 11)."""
import json, sys, numpy as np
D = "bench_out/cgce-detection"
for v in sys.argv[1].split(","):
    row = []
    for s in ("", "_s2", "_s3"):
        try: r = json.load(open(f"{D}/res_{v}{s}.json"))
        except FileNotFoundError: row.append("      -        "); continue
        row.append(f"{np.mean([x['para'] for x in r.values()]):.3f} {sum(x['ben_fp'] for x in r.values())}/{sum(x['ret2_fp'] for x in r.values())} {min(x['multi'] for x in r.values()):.2f}")
    print(f"{v:20s} | " + " | ".join(row))
