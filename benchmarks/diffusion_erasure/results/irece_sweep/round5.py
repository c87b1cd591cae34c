# ruff: noqa
"""Round 5: the gate's calibration -- more held-out negatives and a stricter gate_fpr -- on the TUNING concepts only; see irece_tuned.json.

``python round5.py square,green,checker,triangle [NB]`` (seeds 100 and 200; NB benign prompts per concept and seed, 96).
Grid: n_prompts {48, 96} x gate_fpr {1 %, 0.5 %, 0.25 %}, n_holdout 800 held-out retain generations
(retain prompts n_prompts .. n_prompts + 800, as benchmarks.diffusion_erasure.irece_concept now supplies them).
Per concept the queries are recorded once (forget[:96], retain[:96] at seed 0; retain[48:896] at the held-out
seed) and each grid point's probes and thresholds are fitted from them exactly as calibrate_irece does
(n_prompts 96 uses held rows 48..848, i.e. retain[96:896]; their noise comes from other batch offsets than
a direct calibrate_irece call would draw -- same distribution). Every CRR and bit-identical share below is
from real guarded generation (CGCE + IRECE through erasekit.integrations.diffusers.guard).

Decision rule, fixed before any result of this round was seen: among the six settings, the lowest
mean attack CRR (TI white-box through CGCE, TI black-box, DDIM; 16/16/12 images; 4 concepts; seeds
100 and 200) subject to the pooled benign bit-identical share >= 99.5 % (4 concepts x 2 seeds x NB
benign prompts); ties -> the stricter gate_fpr, then the smaller n_prompts.
"""
from common import *
import dataclasses
from erasekit.integrations.diffusers_calibrate import record_queries, irece_attention_processors
concepts = sys.argv[1].split(","); NB = int(sys.argv[2]) if len(sys.argv) > 2 else 96
SEEDS = (100, 200); NS = (48, 96); FPRS = (0.01, 0.005, 0.0025); NH = 800; NMAX = max(NS)
OUT = Path("/tmp/irece5"); OUT.mkdir(exist_ok=True)
hp0 = {k: v for k, v in de.tuned_irece_hyperparameters().items() if k not in ("n_holdout", "n_prompts", "gate_fpr")}
layers = irece_attention_processors(W.pipe); kw = de.world_call_kwargs(W)

def feats(prompts, seed):
    rec = record_queries(W.pipe, prompts, layers, 1.0, seed=seed, **kw)
    return torch.cat([rec[n].view(len(prompts), -1, rec[n].shape[-1]) for n in layers], -1).numpy()

def pack_from(d, n, fpr, template):
    x = np.concatenate([d["pos"][:n], d["neg"][:n]]); y = np.r_[np.ones(n), np.zeros(n)]
    w, b = irm.fit_step_probes(x, y); S = w.shape[0]
    lo = int(np.floor(hp0["decide_start"] * S)); hi = max(lo + 1, int(np.ceil(hp0["decide_end"] * S)))
    held = d["held"][n - min(NS):n - min(NS) + NH]  # retain[n : n + NH]
    thr = irm.gate_thresholds(np.einsum("nsf,sf->ns", held, w) + b, fpr, lo, hi)
    L = len(template.hyperparameters["layers"]); ws = np.split(w, L, axis=1)
    t = {"probe_bias": torch.tensor(b), "gate_threshold": torch.tensor(thr)}
    t.update({f"probe_weight.{i}": torch.tensor(np.ascontiguousarray(x_), dtype=torch.float32) for i, x_ in enumerate(ws)})
    return dataclasses.replace(template, tensors=t, source=None,
                               hyperparameters={**template.hyperparameters, "gate_fpr": fpr, "gate_holdout_negatives": len(held)})

rows = []
for c in concepts:
    t0 = time.time()
    f = OUT / f"{c}.npz"
    if not f.exists():
        forget = W.train_prompts(c, 300, seed=1); retain = W.retain_prompts(c, NMAX + NH, seed=1)
        np.savez(f, pos=feats(forget[:NMAX], 0), neg=feats(retain[:NMAX], 0), held=feats(retain[min(NS):NMAX + NH], 1_000_003))
    d = dict(np.load(f)); print(c, "features", {k: v.shape for k, v in d.items()}, f"{time.time() - t0:.0f}s", flush=True)
    concept = Concept(c, forget=W.train_prompts(c, 300, seed=1), retain=W.retain_prompts(c, 300, seed=1), keywords=[c])
    template = calibrate_irece(W.pipe, concept, n_prompts=4, n_holdout=4, call_kwargs=kw, **hp0)
    cg = cgce_pack(c)
    packs = {(n, fpr): pack_from(d, n, fpr, template) for n in NS for fpr in FPRS}
    for seed in SEEDS:
        vw = ti_vec(c, seed, white_pack=cg); vb = ti_vec(c, seed); lat = ddim_lat(c, seed)
        benign = [s.prompt for s in W.benign_specs(c, NB, seed + 7)]; base = W.generate(benign, seed + 7)
        def evalg(g):
            r = {"ti_w": crr(ti_images(g, c, vw, 16, seed), c), "ti_b": crr(ti_images(g, c, vb, 16, seed), c),
                 "ddim": crr(W.generate([""] * 12, seed, call=g, erase=[c], latents=lat, guidance_scale=1.0), c)}
            ben = W.generate(benign, seed + 7, call=g, erase=[c])
            r["bit_n"] = int(sum(np.array_equal(a, b_) for a, b_ in zip(ben, base))); r["nb"] = len(benign)
            return r
        settings = [("cgce", None)] + [(f"n{n}_fpr{fpr}", p) for (n, fpr), p in packs.items()]
        for name, ir in settings:
            with guard(W.pipe, [cg] if ir is None else [cg, ir]) as g:
                r = {"concept": c, "seed": seed, "setting": name, **evalg(g)}
            rows.append(r); print(json.dumps(r), flush=True)
    print(c, f"{time.time() - t0:.0f}s", flush=True)
(OUT / f"round5_{'_'.join(concepts)}.json").write_text(json.dumps(rows))
print("SUMMARY (mean over concepts and seeds; bit = pooled benign bit-identical)")
for name in ["cgce"] + [f"n{n}_fpr{fpr}" for n in NS for fpr in FPRS]:
    rs = [r for r in rows if r["setting"] == name]
    m = {k: np.mean([r[k] for r in rs]) for k in ("ti_w", "ti_b", "ddim")}
    bit = sum(r["bit_n"] for r in rs) / sum(r["nb"] for r in rs)
    print(f"{name:16s} ti_w={m['ti_w']:.3f} ti_b={m['ti_b']:.3f} ddim={m['ddim']:.3f} attack={np.mean(list(m.values())):.3f} "
          f"bit={bit:.4f} ({sum(r['nb'] - r['bit_n'] for r in rs)} of {sum(r['nb'] for r in rs)} changed)", flush=True)
