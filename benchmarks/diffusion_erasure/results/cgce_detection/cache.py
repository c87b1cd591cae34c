# ruff: noqa
"""Encode all prompt sets for the 10 DEV concepts once; saves .npy (no pickle) + json prompt lists."""
import sys, json, time
import numpy as np, torch
torch.set_num_threads(1)
from erasekit.testing.diffusion_world import load_world
from erasekit.integrations.diffusers_calibrate import encode_conditioning, concept_embedding
EVAL = {"circle", "star", "red", "blue", "stripes", "dots"}
DEV = ["square", "triangle", "cross", "heart", "green", "yellow", "purple", "orange", "checker", "plain"]
import os
OUT = os.environ.get("OUT", "bench_out/cgce-detection/cache"); CS, ES = int(os.environ.get("CAL_SEED", 1)), int(os.environ.get("EVAL_SEED", 7)); os.makedirs(OUT, exist_ok=True)
world = load_world()
enc = lambda ps: encode_conditioning(world.pipe, ps, 64).numpy().astype(np.float32)
for c in (sys.argv[1].split(",") if len(sys.argv) > 1 else DEV):
    assert c not in EVAL
    t0 = time.time()
    sets = dict(tr=world.train_prompts(c, 1200, seed=CS), re=world.retain_prompts(c, 1200, seed=CS),
                para=world.heldout_prompts(c, 48, seed=ES), ben=[s.prompt for s in world.benign_specs(c, 96, seed=ES)],
                ret2=world.retain_prompts(c, 300, seed=ES + 2), multi=[s.prompt for s in world.multi_specs(c, 48, seed=ES)])
    assert sets["tr"][:300] == world.train_prompts(c, 300, seed=CS) and sets["re"][:300] == world.retain_prompts(c, 300, seed=CS)
    for k, ps in sets.items():
        np.save(f"{OUT}/{c}_{k}.npy", enc(ps), allow_pickle=False)
    syn = world.train_synonyms(c)
    np.save(f"{OUT}/{c}_kw_name.npy", concept_embedding(world.pipe, [c]).numpy(), allow_pickle=False)
    np.save(f"{OUT}/{c}_kw_syn.npy", concept_embedding(world.pipe, syn).numpy(), allow_pickle=False)
    json.dump(dict(sets, syn=syn), open(f"{OUT}/{c}_prompts.json", "w"))
    print(c, round(time.time() - t0, 1), flush=True)
