# ruff: noqa
"""Scratch arm kept for the record: pairs at the CAPTION level (the world caption with the concept swapped for a
sibling: MODE sib; or, 1 in 4, dropped: MODE mix), DEV concepts only. Writes a cache for ../cgce_detection/variants.py:
  PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/diffusion_erasure/results/cgce_pairs/caption_pairs.py square,triangle,cross,heart,green,yellow,purple,orange,checker,plain sib
  CACHE=bench_out/cgce-pairs/cache_sib SUF=_pairs_sib PYTHONPATH=. python benchmarks/diffusion_erasure/results/cgce_detection/variants.py base
"""
import sys, json, os, copy, numpy as np, torch
torch.set_num_threads(1)
from erasekit.testing.diffusion_world import load_world
from erasekit.testing.diffusion_world.scenes import caption, CONCEPTS
from erasekit.testing.diffusion_world.world import _others
from erasekit.integrations.diffusers_calibrate import encode_conditioning
SRC = "bench_out/cgce-detection/cache"; MODE = sys.argv[2]; OUT = f"bench_out/cgce-pairs/cache_{MODE}"
os.makedirs(OUT, exist_ok=True)
w = load_world()
def pairs(c, n, seed):
    fam = w.family(c); sib = [s for s in CONCEPTS[fam] if s != c]
    rng = np.random.default_rng([seed, 2]); U, S = [], []
    for _ in range(n):
        asks = {fam: c, **_others(fam, rng, 0.5)}
        alt = dict(asks)
        if MODE == "sib" or rng.random() < 0.75:
            alt[fam] = sib[rng.integers(len(sib))]
        else:
            del alt[fam]
            if not alt:
                alt[fam] = sib[rng.integers(len(sib))]
        r2 = copy.deepcopy(rng)
        U.append(caption(asks, rng)); S.append(caption(alt, r2))
    return U, S
for c in sys.argv[1].split(","):
    U, S = pairs(c, 300, 1)
    P = json.load(open(f"{SRC}/{c}_prompts.json")); P["tr"], P["re"] = U, S
    json.dump(P, open(f"{OUT}/{c}_prompts.json", "w"))
    for k in ("para", "ben", "ret2", "multi", "kw_name", "kw_syn"):
        dst = f"{OUT}/{c}_{k}.npy"
        if not os.path.exists(dst): os.symlink(os.path.abspath(f"{SRC}/{c}_{k}.npy"), dst)
    np.save(f"{OUT}/{c}_tr.npy", encode_conditioning(w.pipe, U, 64).numpy().astype(np.float32))
    np.save(f"{OUT}/{c}_re.npy", encode_conditioning(w.pipe, S, 64).numpy().astype(np.float32))
    print(c, U[:3], S[:3], flush=True)
