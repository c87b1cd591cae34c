# ruff: noqa
"""Round 4: attack images of the TUNING concepts (seed 100, as in sweep.py round 2) with their per-step queries and detector labels; see irece_tuned.json."""
from common import *
from erasekit.integrations.diffusers_calibrate import _QueryRecorder, cross_attention_processors
from erasekit.integrations.diffusers_calibrate import denoiser_of
concepts = sys.argv[1].split(",")
layers = cross_attention_processors(W.pipe)
def recorded(fn, n):
    den = denoiser_of(W.pipe); orig = dict(den.attn_processors); sink = {}
    den.set_attn_processor({k: (_QueryRecorder(p, k, sink, n) if k in layers else p) for k, p in orig.items()})
    try:
        imgs = fn()
    finally:
        den.set_attn_processor(orig)
    f = torch.cat([torch.stack(sink[k], 1) for k in layers], -1).numpy()  # [n, S, F]
    return imgs, f
for c in concepts:
    t0 = time.time(); cg = cgce_pack(c)
    vw = ti_vec(c, 100, white_pack=cg); vb = ti_vec(c, 100); lat = ddim_lat(c, 100)
    out = {}
    with guard(W.pipe, [cg]) as g:
        for k, fn, n in (("ti_w", lambda: ti_images(g, c, vw, 16, 100), 16), ("ti_b", lambda: ti_images(g, c, vb, 16, 100), 16),
                         ("ddim", lambda: W.generate([""] * 12, 100, call=g, erase=[c], latents=lat, guidance_scale=1.0), 12)):
            imgs, f = recorded(fn, n)
            out[k] = f; out[k + "_y"] = W.detector.finds(imgs, c, W.family(c)).numpy()
    np.savez(f"/tmp/irece3/{c}_atk.npz", **out)
    print(c, {k: (v.shape, v.mean() if k.endswith("_y") else None) for k, v in out.items()}, f"{time.time()-t0:.0f}s", flush=True)
