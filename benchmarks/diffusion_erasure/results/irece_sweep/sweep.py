# ruff: noqa
"""IRECE v2 sweeps on the TUNING concepts (seed 100), kept as run; see irece_tuned.json.

``python sweep.py ROUND CONCEPTS [N]``: round 1 (square, green, checker) compared cut modes,
round 2 (after the CGCE v2 commit) refined the decision window and the masked cut.
"""
from common import *
import json
from pathlib import Path
ROUNDS = {
  1: ([(0.2, 0.5), (0.1, 0.4)], {
    "renoise_only_end0.5": dict(cut="none", strength=0.9, start=0.0, end=0.5),
    "renoise_only_end1": dict(cut="none", strength=0.9, start=0.0, end=1.0),
    "cutmask_s0.5": dict(cut="mask", strength=0.5, start=0.0, end=0.5),
    "cutmask_s0.9": dict(cut="mask", strength=0.9, start=0.0, end=0.5),
    "cutimage_s0.5": dict(cut="image", strength=0.5, start=0.0, end=0.5),
    "cutimage_maskimage_s0.9": dict(cut="image", mask="image", strength=0.9, start=0.0, end=0.5),
    "cutmask_nonoise": dict(cut="mask", strength=0.0, start=0.0, end=0.5),
  }),
  2: ([(0.2, 0.5), (0.1, 0.5), (0.0, 0.5)], {
    "cutmask_s0.9": dict(cut="mask", strength=0.9, start=0.0, end=0.5),
    "cutmask_s1.0": dict(cut="mask", strength=1.0, start=0.0, end=0.5),
    "cutmask_s0.9_end0.7": dict(cut="mask", strength=0.9, start=0.0, end=0.7),
    "cutmask_s0.9_dil2": dict(cut="mask", strength=0.9, start=0.0, end=0.5, dilate=2),
    "cutimage_maskimage_s0.9": dict(cut="image", mask="image", strength=0.9, start=0.0, end=0.5),
  }),
}
ROUND = int(sys.argv[1]); concepts = sys.argv[2].split(","); N = int(sys.argv[3]) if len(sys.argv) > 3 else 8
SEED = 100
decides, variants = ROUNDS[ROUND]
res = {}
for c in concepts:
    t0 = time.time()
    cg = cgce_pack(c)
    vb = ti_vec(c, SEED); vw = ti_vec(c, SEED, white_pack=cg); lat = ddim_lat(c, SEED)[:N]
    benign = [s.prompt for s in W.benign_specs(c, 12, SEED + 7)]
    base_ben = W.generate(benign, SEED + 7)
    def evalg(g):
        r = {"ti_w": crr(ti_images(g, c, vw, N, SEED), c), "ti_b": crr(ti_images(g, c, vb, N, SEED), c),
             "ddim": crr(W.generate([""] * N, SEED, call=g, erase=[c], latents=lat, guidance_scale=1.0), c)}
        ben = W.generate(benign, SEED + 7, call=g, erase=[c])
        r["bit"] = float(np.mean([np.array_equal(a, b) for a, b in zip(ben, base_ben)]))
        return r
    with guard(W.pipe, [cg]) as g:
        res[(c, "cgce")] = evalg(g)
    print(c, "cgce", res[(c, "cgce")], f"{time.time()-t0:.0f}s", flush=True)
    for d in decides:
        t1 = time.time()
        ir0 = irece_pack(c, decide_start=d[0], decide_end=d[1])
        print("  calib", f"{time.time()-t1:.0f}s", {k: ir0.hyperparameters[k] for k in ("gate_train_tpr", "gate_train_fpr", "probe_train_accuracy")}, flush=True)
        for vn, hp in variants.items():
            ir = de.with_hyperparameters(ir0, **hp)
            with guard(W.pipe, [cg, ir]) as g:
                res[(c, d, vn)] = evalg(g)
            print("  ", d, vn, res[(c, d, vn)], flush=True)
Path(f"/tmp/irece/tune{ROUND}_{'_'.join(concepts)}.json").write_text(json.dumps({" / ".join(map(str, k)): v for k, v in res.items()}, default=str))
print("SUMMARY")
for d in decides:
    for vn in variants:
        rows = [res[(c, d, vn)] for c in concepts]
        base = [res[(c, "cgce")] for c in concepts]
        m = {k: np.mean([r[k] for r in rows]) for k in rows[0]}
        b = {k: np.mean([r[k] for r in base]) for k in rows[0]}
        print(d, vn, {k: f"{b[k]:.2f}->{m[k]:.2f}" for k in m})
