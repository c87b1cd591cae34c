# ruff: noqa
"""Full [K,24,384] encodings + attention masks of each DEV concept's training synonyms (for sentence-level features)."""
import json, numpy as np, torch
torch.set_num_threads(1)
from erasekit.testing.diffusion_world import load_world
from erasekit.integrations.diffusers_calibrate import encode_conditioning
from erasekit.testing.diffusion_world.pipeline import build_tokenizer
DEV = ["square", "triangle", "cross", "heart", "green", "yellow", "purple", "orange", "checker", "plain"]
world = load_world(); tok = build_tokenizer()
for c in DEV:
    syn = world.train_synonyms(c)
    E = encode_conditioning(world.pipe, syn, 64).numpy()
    m = np.array(tok(syn, padding="max_length", max_length=24, truncation=True)["attention_mask"], np.float32)
    np.save(f"bench_out/cgce-detection/cache/{c}_synfull.npy", E, allow_pickle=False)
    np.save(f"bench_out/cgce-detection/cache/{c}_synmask.npy", m, allow_pickle=False)
print("ok")
