"""The real SD-1.x CLIP tokenizer and a tiny random Stable Diffusion pipeline, fully offline.

Why: no CLIP, UNet or VAE weights exist on any registry this project can reach, so diffusion
tests cannot use a pretrained pipeline. What they *can* have is the real tokenizer (rebuilt from
the CLIP BPE vocabulary that open-clip-torch ships), so that concept prompts, token positions and
padding behave exactly as in SD-1.x, plus random tiny components with the real module layout
(``CLIPTextModel``, cross-attention ``UNet2DConditionModel``, ``AutoencoderKL``) for hook and
plumbing tests. These fixtures say nothing about image quality.

diffusers' own tests fetch ``hf-internal-testing/tiny-random-clip`` from the Hub, and their
offline fallback ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently yields a broken
tokenizer under transformers 5 (the kwargs are ignored and every id becomes the same), so the
tokenizer here is always loaded with ``CLIPTokenizer.from_pretrained(directory)``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from erasekit.errors import ErasekitError
from erasekit.testing._bpe import bytes_to_unicode
from erasekit.testing.assets import build_cached_dir, cache_dir, clip_bpe_path

__all__ = [
    "CLIP_BOS_ID",
    "CLIP_EOS_ID",
    "CLIP_VOCAB_SIZE",
    "build_clip_tokenizer",
    "build_tiny_sd_pipeline",
    "write_clip_tokenizer_files",
]

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406  # <|startoftext|>
CLIP_EOS_ID = 49407  # <|endoftext|>, also SD-1.x's padding token

#: Reference encoding checked on every build: a wrong vocabulary must fail loudly, not produce
#: plausible-looking but shifted ids that make erasure tests pass or fail for the wrong reason.
_REFERENCE = ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407])

# open_clip's SimpleTokenizer keeps the first 49152 - 256 - 2 merges of the file (line 0 is a header).
_NUM_MERGES = 49152 - 256 - 2


def write_clip_tokenizer_files(out_dir: str | Path, bpe_gz: str | Path | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (HF format) from CLIP's ``bpe_simple_vocab_16e6.txt.gz``.

    The vocabulary is built exactly as open_clip's ``SimpleTokenizer`` builds it: the 256 byte
    symbols, the same symbols with ``</w>``, one entry per merge, then the two special tokens.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(bpe_gz or clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise ErasekitError(
            "erasekit.testing.tiny_sd", str(bpe_gz or "bpe_simple_vocab_16e6.txt.gz"),
            f"expected {CLIP_VOCAB_SIZE} CLIP tokens, built {len(tokens)}",
            "pass the original bpe_simple_vocab_16e6.txt.gz from open-clip-torch",
        )
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text(merges_text, encoding="utf-8")
    return out


def build_clip_tokenizer(path: str | Path | None = None) -> CLIPTokenizer:
    """The SD-1.x CLIP tokenizer (vocab 49408, max length 77, pads with ``<|endoftext|>``).

    ``path`` is the directory that holds (or will hold) ``vocab.json``/``merges.txt``; by default
    ``cache_dir() / "clip-tokenizer-sd1"``, written once with an atomic rename. The result is
    checked against a reference encoding before it is returned.
    """
    if path is None:
        directory = build_cached_dir(cache_dir() / "clip-tokenizer-sd1", write_clip_tokenizer_files)
    else:
        directory = Path(path)
        if not ((directory / "vocab.json").exists() and (directory / "merges.txt").exists()):
            write_clip_tokenizer_files(directory)
    tok = CLIPTokenizer.from_pretrained(
        str(directory), pad_token="<|endoftext|>", model_max_length=77, local_files_only=True
    )
    text, expected = _REFERENCE
    got = tok(text).input_ids
    if got != expected or len(tok) != CLIP_VOCAB_SIZE:
        raise ErasekitError(
            "erasekit.testing.tiny_sd", str(directory),
            f"CLIP tokenizer is wrong: {text!r} -> {got} (expected {expected}), vocab {len(tok)}",
            f"delete {directory} so it is rebuilt from open-clip-torch's bpe_simple_vocab_16e6.txt.gz",
        )
    return tok


def build_tiny_sd_pipeline(seed: int = 0, *, text_hidden_size: int = 32) -> StableDiffusionPipeline:
    """A random tiny SD-1.x-shaped pipeline with the real CLIP tokenizer; deterministic per seed.

    Components: a 2-layer ``CLIPTextModel`` (hidden ``text_hidden_size``, vocab 49408, 77
    positions), a 2-level ``UNet2DConditionModel`` with cross-attention on the lower level
    (``cross_attention_dim`` = ``text_hidden_size``), a 2-level ``AutoencoderKL`` (downsamples
    by 2 where SD's downsamples by 8, so 64x64 images use 32x32 latents) and a ``DDIMScheduler``.
    No safety checker. A 2-step 64x64 generation takes well under a second on CPU. The global
    torch RNG is not touched.
    """
    tokenizer = build_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE,
                hidden_size=text_hidden_size,
                intermediate_size=2 * text_hidden_size,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=CLIP_BOS_ID,
                eos_token_id=CLIP_EOS_ID,
                pad_token_id=CLIP_EOS_ID,
                projection_dim=text_hidden_size,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=text_hidden_size,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            latent_channels=4,
            norm_num_groups=32,
            sample_size=64,
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
