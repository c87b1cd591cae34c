# ruff: noqa
"""Round 4 offline: gate recall at the calibrated 1 % held-out FPR for probe/gate variants, TUNING concepts only; see irece_tuned.json."""
import sys, numpy as np, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from erasekit.steering import irece as irm
concepts = sys.argv[1].split(",")
FPR, DS, DE = 0.01, 0.2, 0.5
CS = tuple(float(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1,0.1,0.01,0.001").split(","))
MODES = tuple((sys.argv[3] if len(sys.argv) > 3 else "max,cum,ema").split(","))

def gate(held, lo, hi, mode):
    mu, sd = held.mean(0), held.std(0) + 1e-6
    def stat(L):
        z = ((L - mu) / sd)[:, lo:hi]
        if mode == "max":
            return z
        if mode == "cum":  # running mean of z over the window (sqrt-normalised sum)
            k = np.arange(1, z.shape[1] + 1)
            return np.cumsum(z, 1) / np.sqrt(k)
        if mode == "ema":
            out = np.zeros_like(z); acc = 0
            for j in range(z.shape[1]):
                acc = z[:, j] if j == 0 else 0.5 * acc + 0.5 * z[:, j]; out[:, j] = acc
            return out
    s = stat(held).max(1)
    thr = float(np.quantile(s, 1 - FPR)) if FPR * len(s) >= 1 else float(s.max())
    def apply(L):
        st = stat(L); hit = st > thr
        first = np.where(hit.any(1), hit.argmax(1) + lo, -1)
        return hit.any(1), first
    return apply

rows = {}
for c in concepts:
    d = dict(np.load(f"/tmp/irece3/{c}.npz")); a = np.load(f"/tmp/irece3/{c}_atk.npz")
    for k in ("ti_w", "ti_b", "ddim"):  # the attack images as sweep.py round 2 draws them (under CGCE), only those that show the concept
        d[k] = a[k][a[k + "_y"] > 0.5]
    S = d["pos"].shape[1]; lo = int(np.floor(DS * S)); hi = max(lo + 1, int(np.ceil(DE * S)))
    for n in (48, 96, 144):
        for C in CS:
            x = np.concatenate([d["pos"][:n], d["neg"][:n]]); y = np.r_[np.ones(n), np.zeros(n)]
            w, b = irm.fit_step_probes(x, y, C=C)
            lg = lambda f: np.einsum("nsf,sf->ns", f, w) + b
            held = lg(d["held"][n:])  # as calibrate_irece: retain[n:], other seed
            for mode in MODES:
                ap = gate(held, lo, hi, mode)
                r = {}
                for k in ("ti_w", "ti_b", "ddim"):
                    hit, first = ap(lg(d[k])) if len(d[k]) else (np.array([np.nan]), None); r[k] = (hit.mean(), first[hit].mean() if first is not None and hit.any() else -1)
                fp2, _ = ap(lg(d["neg"][n:]))  # unused fit-seed retain: a second FP check
                r["fp2"] = (fp2.mean(), 0)
                rows[(c, n, C, mode)] = r
                print(c, n, C, mode, " ".join(f"{k}={v[0]:.2f}@{v[1]:.1f}" for k, v in r.items()), flush=True)
print("SUMMARY mean over", concepts, "(recall ti_w, ti_b, ddim, fp2 on unused retain)")
for n in (48, 96, 144):
    for C in CS:
        for mode in MODES:
            m = {k: np.nanmean([rows[(c, n, C, mode)][k][0] for c in concepts]) for k in ("ti_w", "ti_b", "ddim", "fp2")}
            print(n, C, mode, " ".join(f"{k}={v:.3f}" for k, v in m.items()))
