# ruff: noqa
"""Round 4: CRR with IRECE packs fitted on more calibration generations / other C, from the queries gate_feats.py recorded; TUNING concepts, seed 100; see irece_tuned.json."""
from common import *
import dataclasses
concepts = sys.argv[1].split(","); variants = [tuple(float(x) for x in v.split(":")) for v in sys.argv[2].split(",")]  # n:C
PERT = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {"base": {}}  # perturbation variants (round 4b)
SEED = int(os.environ.get("R4SEED", "100")); hp0 = de.tuned_irece_hyperparameters(); DIAG = len(sys.argv) > 3 and sys.argv[3] == "diag"
def pack_from(c, n, C, template):
    d = np.load(f"/tmp/irece3/{c}.npz"); n = int(n)
    x = np.concatenate([d["pos"][:n], d["neg"][:n]]); y = np.r_[np.ones(n), np.zeros(n)]
    w, b = irm.fit_step_probes(x, y, C=C); S = w.shape[0]
    lo = int(np.floor(hp0["decide_start"] * S)); hi = max(lo + 1, int(np.ceil(hp0["decide_end"] * S)))
    thr = irm.gate_thresholds(np.einsum("nsf,sf->ns", d["held"][n:], w) + b, hp0["gate_fpr"], lo, hi)
    L = len(template.hyperparameters["layers"]); ws = np.split(w, L, axis=1)
    t = {"probe_bias": torch.tensor(b), "gate_threshold": torch.tensor(thr)}
    t.update({f"probe_weight.{i}": torch.tensor(np.ascontiguousarray(x_), dtype=torch.float32) for i, x_ in enumerate(ws)})
    return dataclasses.replace(template, tensors=t, source=None)
for c in concepts:
    concept = Concept(c, forget=W.train_prompts(c, 300, seed=1), retain=W.retain_prompts(c, 300, seed=1), keywords=[c])
    hp = {k: v for k, v in hp0.items() if k != "n_holdout"}
    template = calibrate_irece(W.pipe, concept, n_prompts=4, n_holdout=4, call_kwargs=de.world_call_kwargs(W), **hp)
    cg = cgce_pack(c); vw = ti_vec(c, SEED, white_pack=cg); vb = ti_vec(c, SEED); lat = ddim_lat(c, SEED)
    benign = [s.prompt for s in W.benign_specs(c, 24, 107)]; base = W.generate(benign, 107)
    for (n, C), (pn, ph) in [(v, p) for v in variants for p in PERT.items()]:
        ir = de.with_hyperparameters(pack_from(c, n, C, template), **ph)
        with guard(W.pipe, [cg, ir]) as g:
            r = {}
            for k, fn in (("ti_w", lambda: ti_images(g, c, vw, 16, SEED)), ("ti_b", lambda: ti_images(g, c, vb, 16, SEED)),
                          ("ddim", lambda: W.generate([""] * 12, SEED, call=g, erase=[c], latents=lat, guidance_scale=1.0))):
                found = W.detector.finds(fn(), c, W.family(c)).numpy()
                r[k] = float(found.mean())
                if DIAG:
                    lat_ = sorted(set(i + 16 * j for j, rep in enumerate(g.last_reports if hasattr(g, "last_reports") else []) for i in rep.irece_latched.get(c, [])))
                    print("   ", k, "found", np.nonzero(found)[0].tolist(), "report", getattr(g, "last_report", None) and g.last_report.irece_latched, flush=True)
            ben = W.generate(benign, 107, call=g, erase=[c])
        r["bit"] = float(np.mean([np.array_equal(a, b_) for a, b_ in zip(ben, base)]))
        print(c, int(n), C, pn, r, flush=True)
