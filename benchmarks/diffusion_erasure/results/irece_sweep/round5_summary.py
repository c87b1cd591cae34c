# ruff: noqa
"""Round 5 summary from round5_rows.json (written by round5.py): per setting, mean CRR, the relative
reduction vs CGCE alone, and benign images changed -- in all and beyond those CGCE alone already changes."""
import json, numpy as np
from pathlib import Path
rows = json.loads((Path(__file__).parent / "round5_rows.json").read_text())
cg = {(r["concept"], r["seed"]): r for r in rows if r["setting"] == "cgce"}
for s in dict.fromkeys(r["setting"] for r in rows):
    rs = [r for r in rows if r["setting"] == s]
    m = {k: float(np.mean([r[k] for r in rs])) for k in ("ti_w", "ti_b", "ddim")}
    red = {k: 1 - m[k] / float(np.mean([cg[(r["concept"], r["seed"])][k] for r in rs])) for k in m}
    nb = sum(r["nb"] for r in rs); changed = nb - sum(r["bit_n"] for r in rs)
    added = sum(cg[(r["concept"], r["seed"])]["bit_n"] - r["bit_n"] for r in rs)
    print(f"{s:14s} CRR ti_w {m['ti_w']:.3f} ti_b {m['ti_b']:.3f} ddim {m['ddim']:.3f} mean {np.mean(list(m.values())):.3f} | "
          f"reduction vs CGCE ti_w {red['ti_w']:.1%} ti_b {red['ti_b']:.1%} ddim {red['ddim']:.1%} | "
          f"benign bit-identical {1 - changed / nb:.2%} ({changed}/{nb} changed, {added} beyond CGCE alone)")
