"""Train the world: VAE, then concept detector, then UNet; resumable, with progress bars.

Why this order: the detector also learns from VAE reconstructions (generated images share the
VAE's slight blur), and the UNet learns in the VAE's latent space, so both need the VAE first.
The MiniLM text encoder is frozen, so every training caption is encoded once up front and the
UNet steps never run BERT.

Run with ``erasekit bench diffusion-world --train`` (which calls :func:`train_world`). State is
checkpointed to ``work_dir/state.pt`` every ``checkpoint_every`` steps; rerunning the same
command resumes where it stopped. The result is written to ``out_dir`` (by default the package's
``weights/`` folder, which is committed when small enough).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from erasekit.testing.diffusion_world import pipeline as wp
from erasekit.testing.diffusion_world.detector import ConceptDetector, to_tensor
from erasekit.testing.diffusion_world.scenes import (
    CONCEPTS,
    FAMILIES,
    render_many,
    sample_scenes,
    training_caption_for,
)

__all__ = ["TrainConfig", "train_world", "HELDOUT_REAL_SEED"]

#: Seed of the held-out real scenes (detector test set); training uses ``data_seed``.
HELDOUT_REAL_SEED = 10_007


@dataclass
class TrainConfig:
    n_images: int = 8_000
    data_seed: int = 0
    captions_per_image: int = 2
    vae_steps: int = 400
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-5
    detector_steps: int = 1500
    detector_batch: int = 96
    unet_steps: int = 4000
    unet_batch: int = 48
    unet_lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    checkpoint_every: int = 200
    seed: int = 0


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_state(path: Path) -> dict:
    return torch.load(path, weights_only=True) if path.is_file() else {}


def _train_vae(vae, images: torch.Tensor, cfg: TrainConfig, state: dict, ckpt: Path) -> None:
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    step = 0
    if "vae" in state:
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["vae_opt"])
        step = int(state["vae_step"])
    vae.train()
    bar = tqdm(total=cfg.vae_steps, initial=step, desc="world: VAE", unit="step")
    while step < cfg.vae_steps:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=g)
        x = images[idx] * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
            state.update(vae=vae.state_dict(), vae_opt=opt.state_dict(), vae_step=step)
            _save_state(ckpt, state)
    bar.close()
    vae.eval()


@torch.no_grad()
def _encode_latents(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + batch] * 2 - 1).latent_dist.mean for i in range(0, len(images), batch)])


@torch.no_grad()
def _reconstruct(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        z = vae.encode(images[i:i + batch] * 2 - 1).latent_dist.mean
        out.append(((vae.decode(z).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def _label_tensor(scenes) -> dict[str, torch.Tensor]:
    return {f: torch.tensor([CONCEPTS[f].index(s.labels()[f]) for s in scenes]) for f in FAMILIES}


def _train_detector(det: ConceptDetector, images: torch.Tensor, recon: torch.Tensor, labels: dict,
                    cfg: TrainConfig, ckpt: Path) -> None:
    """Train the detector; it checkpoints to its OWN file so it can be retrained on its own."""
    opt = torch.optim.Adam(det.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.detector_steps)
    state = _load_state(ckpt)
    step = 0
    if "detector" in state:
        det.load_state_dict(state["detector"])
        opt.load_state_dict(state["det_opt"])
        sched.load_state_dict(state["det_sched"])
        step = int(state["det_step"])
    det.train()
    n_rec = len(recon)
    bar = tqdm(total=cfg.detector_steps, initial=step, desc="world: detector", unit="step")
    while step < cfg.detector_steps:
        g = torch.Generator().manual_seed(cfg.seed * 7_000_003 + step)
        idx = torch.randint(0, len(images), (cfg.detector_batch,), generator=g)
        use_rec = (torch.rand(cfg.detector_batch, generator=g) < 0.5) & (idx < n_rec)
        x = torch.where(use_rec[:, None, None, None], recon[idx.clamp(max=n_rec - 1)], images[idx])
        x = (x + torch.randn(x.shape, generator=g) * 0.04 * torch.rand(len(x), 1, 1, 1, generator=g)).clamp(0, 1)
        logits = det.logits(x)
        loss = sum(F.cross_entropy(logits[f], labels[f][idx]) for f in FAMILIES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.detector_steps:
            _save_state(ckpt, dict(detector=det.state_dict(), det_opt=opt.state_dict(),
                                   det_sched=sched.state_dict(), det_step=step))
    bar.close()
    det.eval()


def _captions(scenes, cfg: TrainConfig) -> list[str]:
    rng = np.random.default_rng(cfg.data_seed + 1)
    return [training_caption_for(s, rng) for s in scenes for _ in range(cfg.captions_per_image)]


def _train_unet(unet, latents: torch.Tensor, emb: torch.Tensor, empty: torch.Tensor, scheduler,
                cfg: TrainConfig, state: dict, ckpt: Path):
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    step = 0
    if "unet" in state:
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["unet_ema"])
        opt.load_state_dict(state["unet_opt"])
        step = int(state["unet_step"])
    unet.train()
    acp = scheduler.alphas_cumprod
    k = cfg.captions_per_image
    bar = tqdm(total=cfg.unet_steps, initial=step, desc="world: UNet", unit="step")
    while step < cfg.unet_steps:
        g = torch.Generator().manual_seed(cfg.seed * 9_000_011 + step)
        idx = torch.randint(0, len(latents), (cfg.unet_batch,), generator=g)
        cap = idx * k + torch.randint(0, k, (cfg.unet_batch,), generator=g)
        cond = emb[cap].float()
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.cfg_dropout
        cond = torch.where(drop[:, None, None], empty.float().expand_as(cond), cond)
        x0 = latents[idx]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = acp[t].sqrt()[:, None, None, None]
        s = (1 - acp[t]).sqrt()[:, None, None, None]
        pred = unet(a * x0 + s * noise, t, cond).sample
        loss = F.mse_loss(pred, noise)
        for group in opt.param_groups:
            group["lr"] = cfg.unet_lr * min(1.0, (step + 1) / cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps:
            state.update(unet=unet.state_dict(), unet_ema=ema.state_dict(), unet_opt=opt.state_dict(), unet_step=step)
            _save_state(ckpt, state)
    bar.close()
    return ema.eval()


def train_world(out_dir: Path, work_dir: Path, cfg: TrainConfig | None = None) -> dict:
    """Train (or resume training) the whole world and write it to ``out_dir``; returns its metadata."""
    from diffusers import StableDiffusionPipeline

    cfg = cfg or TrainConfig()
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = work_dir / "state.pt"
    state = _load_state(ckpt)
    # Step counts may change between runs (cut or extend a stage under CPU pressure): a stage
    # whose saved step already reaches the new count is simply done. Anything else must match.
    flexible = ("vae_steps", "detector_steps", "unet_steps", "checkpoint_every")
    if state and {k: v for k, v in state.get("config", {}).items() if k not in flexible} != {
            k: v for k, v in asdict(cfg).items() if k not in flexible}:
        raise RuntimeError(f"{ckpt} was written with another TrainConfig; delete {work_dir} to start over")
    state["config"] = asdict(cfg)
    t0 = time.time()

    scenes = sample_scenes(cfg.n_images, cfg.data_seed)
    images = to_tensor(render_many(scenes))
    vae = wp.build_vae(cfg.seed)
    _train_vae(vae, images, cfg, state, ckpt)

    recon = _reconstruct(vae, images[:4000])
    vae_mse = float(F.mse_loss(recon, images[:4000]))
    torch.manual_seed(cfg.seed)
    det = ConceptDetector()
    _train_detector(det, images, recon, _label_tensor(scenes), cfg, work_dir / "detector.pt")
    test_scenes = sample_scenes(1000, HELDOUT_REAL_SEED)
    test_images = render_many(test_scenes)
    det_acc = det.accuracy(test_images, [s.labels() for s in test_scenes])
    det_acc_rec = det.accuracy(_reconstruct(vae, to_tensor(test_images)), [s.labels() for s in test_scenes])

    latents = _encode_latents(vae, images)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling

    scheduler = wp.build_scheduler()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=wp.build_text_encoder(), tokenizer=wp.build_tokenizer(), unet=wp.build_unet(cfg.seed),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    cap_file = work_dir / "captions.safetensors"
    if cap_file.is_file():
        emb = load_file(cap_file)["emb"]
    else:
        caps = _captions(scenes, cfg)
        emb = torch.cat([wp.encode_text(pipe, caps[i:i + 2048]) for i in
                         tqdm(range(0, len(caps), 2048), desc="world: encode captions")]).half()
        save_file({"emb": emb}, cap_file)
    empty = wp.encode_text(pipe, [""])[0]
    ema = _train_unet(pipe.unet, latents, emb, empty, scheduler, cfg, state, ckpt)
    pipe.register_modules(unet=ema)

    out_dir.mkdir(parents=True, exist_ok=True)
    wp.save_pipeline(pipe, out_dir)
    save_file({k: v.contiguous() for k, v in det.state_dict().items()}, out_dir / "detector.safetensors")
    meta = {
        "train_config": asdict(cfg),
        "vae_reconstruction_mse": vae_mse,
        "vae_scaling_factor": scaling,
        "detector_accuracy_heldout_real": det_acc,
        "detector_accuracy_heldout_real_vae_recon": det_acc_rec,
        "train_seconds_this_run": round(time.time() - t0, 1),
        "torch": torch.__version__,
    }
    (out_dir / "train_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
