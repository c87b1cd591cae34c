# ruff: noqa
"""Round 4: record per-step mean cross-attention queries on the TUNING concepts (seed 100) for offline gate variants; see irece_tuned.json."""
from common import *
from erasekit.integrations.diffusers_calibrate import record_queries, cross_attention_processors
concepts = sys.argv[1].split(",")
layers = cross_attention_processors(W.pipe)
kw = de.world_call_kwargs(W)
def feats(prompts, seed, **extra):
    rec = record_queries(W.pipe, prompts, layers, 1.0, seed=seed, **{**kw, **extra})
    return torch.cat([rec[n].view(len(prompts), -1, rec[n].shape[-1]) for n in layers], -1).numpy()
for c in concepts:
    t0 = time.time()
    forget = W.train_prompts(c, 300, seed=1); retain = W.retain_prompts(c, 300, seed=1)
    cg = cgce_pack(c)
    vw = ti_vec(c, 100, white_pack=cg); vb = ti_vec(c, 100); lat = ddim_lat(c, 100)
    ti_prompts = [TI_TEMPLATES[i % len(TI_TEMPLATES)].format(PLACEHOLDER) for i in range(16)]
    out = {"pos": feats(forget[:144], 0), "neg": feats(retain[:300], 0), "held": feats(retain[:300], 1_000_003)}
    with token_override(W.pipe.text_encoder, placeholder_id(W), vw):
        out["ti_w"] = feats(ti_prompts, 100)
    with token_override(W.pipe.text_encoder, placeholder_id(W), vb):
        out["ti_b"] = feats(ti_prompts, 100)
    out["ddim"] = feats([""] * len(lat), 100, latents=lat, guidance_scale=1.0)
    np.savez(f"/tmp/irece3/{c}.npz", **out)
    print(c, {k: v.shape for k, v in out.items()}, f"{time.time()-t0:.0f}s", flush=True)
