# ruff: noqa
"""Generic CGCE-detector variants on the 10 DEV concepts (cached encodings from cache.py).

Usage: PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diffusion_erasure/results/cgce_detection/variants.py VARIANT[,VARIANT...] [concepts]
Re-implements fit_detector's model (ConceptAttentionPool -> centring -> L2 LR, C = strongest reg within
0.5 % of best CV acc) on precomputed features (the pool is stateless, so this is the same model).
"""
import sys, json, time
import numpy as np, torch
torch.set_num_threads(1)
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from erasekit.classifiers.features import concept_features_np
from erasekit.classifiers.detector import C_GRID

EVAL = {"circle", "star", "red", "blue", "stripes", "dots"}
DEV = ["square", "triangle", "cross", "heart", "green", "yellow", "purple", "orange", "checker", "plain"]
import os
D = os.environ.get("CACHE", "bench_out/cgce-detection/cache"); SUF = os.environ.get("SUF", "")
ld = lambda c, k: np.load(f"{D}/{c}_{k}.npy", allow_pickle=False)

_tok = None
def nonpad_mask(prompts):
    global _tok
    if _tok is None:
        from erasekit.testing.diffusion_world.pipeline import build_tokenizer
        _tok = build_tokenizer()
    return np.array(_tok(prompts, padding="max_length", max_length=24, truncation=True)["attention_mask"], np.float32)

def feats(E, kw, tau, flat, mean_mode="all", prompts=None, mc=1.0, sent=None, sS=None, sscale=10.0):
    F = concept_features_np(E, kw, tau, flat)
    d = E.shape[2]
    F[:, 2 * d] *= mc
    if sent:
        m = nonpad_mask(prompts) if sent == "mask" else np.ones(E.shape[:2], np.float32)
        s = (E * m[:, :, None]).sum(1) / m.sum(1, keepdims=True)
        u = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
        cs = u(s) @ u(sS).T
        F = np.concatenate([F, sscale * cs, sscale * cs.max(1, keepdims=True)], 1)
    if mean_mode == "nonpad":
        m = nonpad_mask(prompts)
        d = E.shape[2]
        F[:, d:2 * d] = (E * m[:, :, None]).sum(1) / m.sum(1, keepdims=True)
    elif mean_mode == "none":
        d = E.shape[2]; F = np.delete(F, np.s_[d:2 * d], axis=1)
    return F

def syn_groups(prompts, syn):
    order = sorted(range(len(syn)), key=lambda i: -len(syn[i]))
    g = []
    for p in prompts:
        hit = next((i for i in order if syn[i] in p), -1)
        assert hit >= 0, p
        g.append(hit)
    return np.array(g)

def lr(C, seed=0):
    return LogisticRegression(C=C, max_iter=2000, random_state=seed)

class Det:
    def __init__(self, Xtr, y, C):
        self.mu = Xtr.mean(0); self.m = lr(C).fit(Xtr - self.mu, y); self.C = C
    def p(self, X):
        return 1 / (1 + np.exp(-self.m.decision_function(X - self.mu)))

def choose_C(X, y, cv, groups=None, score="acc"):
    if cv == "kfold3":
        splits = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    else:  # leave-one-synonym-group-out; retain spread round-robin over the groups
        gpos = groups
        G = np.unique(gpos)
        neg = np.where(y == 0)[0]; rng = np.random.default_rng(0); gneg = rng.permutation(len(neg)) % len(G)
        pos = np.where(y == 1)[0]
        splits = []
        for j, g in enumerate(G):
            te = np.concatenate([pos[gpos == g], neg[gneg == j]])
            tr = np.setdiff1d(np.arange(len(y)), te)
            splits.append((tr, te))
    sc = {}
    for C in C_GRID:
        s = []
        for tr, te in splits:
            mu = X[tr].mean(0); m = lr(C).fit(X[tr] - mu, y[tr]); pr = m.predict(X[te] - mu)
            if score == "acc": s.append((pr == y[te]).mean())
            else: s.append(0.5 * ((pr[y[te] == 1] == 1).mean() + (pr[y[te] == 0] == 0).mean()))  # balanced acc
        sc[C] = float(np.mean(s))
    best = max(sc.values())
    return min(C for C, v in sc.items() if v >= best - 0.005), sc

VARIANTS = {
    "base":        dict(),
    "noflat":      dict(flat=False),
    "syn":         dict(kw="syn"),
    "syn_noflat":  dict(kw="syn", flat=False),
    "gcv":         dict(cv="group"),
    "gcv_noflat":  dict(cv="group", flat=False),
    "syn_gcv":     dict(kw="syn", cv="group"),
    "tau05":       dict(tau=0.05), "tau2": dict(tau=0.2), "tau5": dict(tau=0.5),
    "tau05_noflat": dict(tau=0.05, flat=False), "tau2_noflat": dict(tau=0.2, flat=False), "tau5_noflat": dict(tau=0.5, flat=False),
    "n600":        dict(n=600), "n1200": dict(n=1200),
    "n1200_noflat": dict(n=1200, flat=False),
    "nonpad":      dict(mean="nonpad"), "nonpad_noflat": dict(mean="nonpad", flat=False),
    "mc10": dict(mc=10.0), "mc10_noflat": dict(mc=10.0, flat=False), "mc30_noflat": dict(mc=30.0, flat=False),
    "sentm": dict(sent="mask"), "sentm_noflat": dict(sent="mask", flat=False), "senta": dict(sent="all"),
    "senta_noflat": dict(sent="all", flat=False),
    "oofmax": dict(thr="oofmax"), "oof99": dict(thr="oof99"), "oofmax_noflat": dict(thr="oofmax", flat=False),
    "oof99_noflat": dict(thr="oof99", flat=False), "tau05_oofmax": dict(tau=0.05, thr="oofmax"),
    "tau05_noflat_oofmax": dict(tau=0.05, flat=False, thr="oofmax"), "tau05_ens": dict(tau=0.05, ens=True),
    "tau05_syn_ens": dict(tau=0.05, ens=True, kw="syn"), "tau05_syn_noflat": dict(tau=0.05, kw="syn", flat=False),
    "tau05_syn": dict(tau=0.05, kw="syn"), "tau02_syn_noflat": dict(tau=0.02, kw="syn", flat=False),
    "tau02_noflat": dict(tau=0.02, flat=False), "tau02_syn": dict(tau=0.02, kw="syn"),
    "ens":         dict(ens=True),       # max(p_flat, p_noflat)
    "syn_ens":     dict(ens=True, kw="syn"),
}

def run(c, v):
    o = dict(thr=None, mc=1.0, sent=None, kw="name", flat=True, tau=0.1, n=300, cv="kfold3", mean="all", ens=False, C=None, score="acc")
    o.update(v)
    P = json.load(open(f"{D}/{c}_prompts.json"))
    n = o["n"]
    kw = ld(c, "kw_" + o["kw"])
    Etr = np.concatenate([ld(c, "tr")[:n], ld(c, "re")[:n]]); y = np.r_[np.ones(n), np.zeros(n)].astype(int)
    ptr = P["tr"][:n] + P["re"][:n]
    groups = syn_groups(P["tr"][:n], P["syn"])
    ev = {k: (ld(c, k), P[k]) for k in ("para", "ben", "ret2", "multi")}
    flats = [True, False] if o["ens"] else [o["flat"]]
    sS = None
    if o["sent"]:
        Ef, mf = ld(c, "synfull"), ld(c, "synmask")
        sS = (Ef * mf[..., None]).sum(1) / mf.sum(1, keepdims=True) if o["sent"] == "mask" else Ef.mean(1)
    fk = dict(mc=o["mc"], sent=o["sent"], sS=sS)
    thr = 0.5
    probs, Cs = {k: [] for k in ev}, []
    for fl in flats:
        X = feats(Etr, kw, o["tau"], fl, o["mean"], ptr, **fk)
        C = o["C"] or choose_C(X, y, o["cv"], groups, o["score"])[0]
        det = Det(X, y, C); Cs.append(C)
        if o["thr"]:  # threshold from out-of-fold calibration retain scores (= a bias shift), capped at 0.5
            oof = np.zeros(len(y))
            for tr, te in StratifiedKFold(3, shuffle=True, random_state=0).split(X, y):
                oof[te] = Det(X[tr], y[tr], C).p(X[te])
            r = oof[y == 0]
            thr = min(0.5, r.max() if o["thr"] == "oofmax" else np.quantile(r, 0.99))
        for k, (E, ps) in ev.items():
            probs[k].append(det.p(feats(E, kw, o["tau"], fl, o["mean"], ps, **fk)))
    pr = {k: np.max(v, axis=0) for k, v in probs.items()}
    # report scores rescaled so that the decision threshold maps to 0.5 (logit shift)
    lg = lambda p: np.log(np.clip(p, 1e-9, 1 - 1e-9) / np.clip(1 - p, 1e-9, 1))
    pr = {k: 1 / (1 + np.exp(-(lg(v) - lg(np.float64(thr))))) for k, v in pr.items()}
    return dict(C=Cs, thr=float(thr), para=float((pr["para"] > .5).mean()), ben_fp=int((pr["ben"] > .5).sum()),
                ret2_fp=int((pr["ret2"] > .5).sum()), multi=float((pr["multi"] > .5).mean()),
                scores={k: [round(float(x), 5) for x in a] for k, a in pr.items()})

if __name__ == "__main__":
    vs = sys.argv[1].split(",")
    cs = sys.argv[2].split(",") if len(sys.argv) > 2 else DEV
    assert not EVAL & set(cs)
    for name in vs:
        t0 = time.time(); res = {}
        for c in cs:
            res[c] = run(c, VARIANTS[name])
        json.dump(res, open(f"bench_out/cgce-detection/res_{name}{SUF}.json", "w"))
        para = [res[c]["para"] for c in cs]
        print(f"{name:14s} mean={np.mean(para):.3f} benFP={sum(r['ben_fp'] for r in res.values())} "
              f"ret2FP={sum(r['ret2_fp'] for r in res.values())} multimin={min(r['multi'] for r in res.values()):.2f} "
              + " ".join(f"{c[:4]}={res[c]['para']:.2f}" for c in cs) + f" C={[res[c]['C'] for c in cs]} ({time.time()-t0:.0f}s)", flush=True)
