# ruff: noqa
"""Shared set-up of the IRECE sweep scripts (TUNING concepts only), kept as run; see irece_tuned.json."""
import os, sys, json, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from pathlib import Path
REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))
import torch, numpy as np
torch.set_num_threads(1)
import warnings; warnings.filterwarnings("ignore")
from pathlib import Path
from benchmarks import diffusion_erasure as de
from benchmarks.diffusion_world.attacks import PLACEHOLDER, TI_TEMPLATES, NoGuard, learn_embedding, ddim_invert, placeholder_id, token_override
from erasekit.guardrails.pack import ConceptPack
from erasekit.guardrails.concept import Concept
from erasekit.integrations.diffusers import guard
from erasekit.integrations.diffusers_calibrate import calibrate_irece, calibrate_cgce
from erasekit.steering import irece as irm
from erasekit.testing.diffusion_world import load_world
import diffusers, transformers
diffusers.utils.logging.set_verbosity_error(); transformers.utils.logging.set_verbosity_error()
W = load_world(); W.pipe.set_progress_bar_config(disable=True)
CACHE = Path("/tmp/irece/cache"); CACHE.mkdir(parents=True, exist_ok=True)

def cgce_pack(c, n=300):
    p = REPO / f"bench_out/diffusion-erasure/packs/{c}-cgce-{n}"
    if not p.is_dir():
        p = CACHE / f"{c}-cgce-{n}"
        if not p.is_dir():
            concept = Concept(c, forget=W.train_prompts(c, n, seed=1), retain=W.retain_prompts(c, n, seed=1), keywords=[c])
            calibrate_cgce(W.pipe, concept).save_pretrained(p)
    return de.with_hyperparameters(ConceptPack.from_pretrained(p), **de.tuned_cgce_hyperparameters())

def irece_pack(c, n=48, **hp):
    concept = Concept(c, forget=W.train_prompts(c, 300, seed=1), retain=W.retain_prompts(c, 300, seed=1), keywords=[c])
    return calibrate_irece(W.pipe, concept, n_prompts=n, call_kwargs=de.world_call_kwargs(W), **hp)

def ti_vec(c, seed, white_pack=None, steps=60, n_img=16):
    f = CACHE / f"ti-{c}-{seed}-{'w' if white_pack is not None else 'b'}.pt"
    if f.exists(): return torch.load(f, weights_only=True)
    real = W.real_images(c, n_img, seed)
    if white_pack is None:
        v, _ = learn_embedding(W, c, real, steps, seed, lambda: NoGuard(W.pipe).erasing([c]))
    else:
        with guard(W.pipe, [white_pack]) as g:
            v, _ = learn_embedding(W, c, real, steps, seed, lambda: g.erasing([c]))
    torch.save(v, f); return v

def ddim_lat(c, seed, n=12):
    f = CACHE / f"ddim-{c}-{seed}.pt"
    if f.exists(): return torch.load(f, weights_only=True)
    lat = ddim_invert(W, W.real_images(c, n, seed + 1), lambda: NoGuard(W.pipe).erasing([c]))
    torch.save(lat, f); return lat

def ti_images(call, c, vec, n, seed):
    prompts = [TI_TEMPLATES[i % len(TI_TEMPLATES)].format(PLACEHOLDER) for i in range(n)]
    with token_override(W.pipe.text_encoder, placeholder_id(W), vec):
        return W.generate(prompts, seed, call=call, erase=[c])

def crr(imgs, c):
    return float(W.detector.finds(imgs, c, W.family(c)).float().mean())
