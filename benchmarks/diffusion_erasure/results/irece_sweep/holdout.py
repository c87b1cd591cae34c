# ruff: noqa
"""IRECE gate with more held-out negatives, TUNING concepts (seed 100), kept as run; see irece_tuned.json."""
from common import *
c = sys.argv[1]; nh = int(sys.argv[2]); hp = de.tuned_irece_hyperparameters()
cg = cgce_pack(c)
concept = Concept(c, forget=W.train_prompts(c, 400, seed=1), retain=W.retain_prompts(c, 400, seed=1), keywords=[c])
t0 = time.time()
ir = calibrate_irece(W.pipe, concept, n_prompts=48, n_holdout=nh, call_kwargs=de.world_call_kwargs(W), **hp)
print(c, nh, "calib", round(time.time() - t0), {k: ir.hyperparameters[k] for k in ("gate_train_tpr", "gate_train_fpr")}, flush=True)
vw = ti_vec(c, 100, white_pack=cg); vb = ti_vec(c, 100); lat = ddim_lat(c, 100)[:8]
benign = [s.prompt for s in W.benign_specs(c, 24, 107)]
base = W.generate(benign, 107)
with guard(W.pipe, [cg, ir]) as g:
    r = {"ti_w": crr(ti_images(g, c, vw, 8, 100), c), "ti_b": crr(ti_images(g, c, vb, 8, 100), c),
         "ddim": crr(W.generate([""] * 8, 100, call=g, erase=[c], latents=lat, guidance_scale=1.0), c)}
    ben = W.generate(benign, 107, call=g, erase=[c])
    r["bit"] = float(np.mean([np.array_equal(a, b) for a, b in zip(ben, base)]))
print(c, nh, r, flush=True)
