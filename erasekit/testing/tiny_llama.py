"""A tiny random Llama chat model built entirely in code, for fast hook and plumbing tests.

Why: steering, guardrail and vLLM-integration tests need a real ``LlamaForCausalLM`` (the same
module tree, attention and residual stream as SmolLM2 or Llama-3) that builds in milliseconds,
is bit-identical for a given seed, and needs no download. The tokenizer is byte-level BPE with
no merges (every UTF-8 byte is one token), so any text round-trips and nothing has to be
trained or fetched.

The default shape (hidden 128, 2 query heads, 1 KV head) gives ``head_dim`` 64: vLLM's CPU
attention backend rejects small head sizes such as 16 (``Unsupported CPU attention
configuration``), and 64 is what SmolLM2 and most Llamas use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from erasekit.testing._bpe import bytes_to_unicode

__all__ = [
    "MIXED_BATCH_PROMPTS",
    "TINY_LLAMA_CHAT_TEMPLATE",
    "TINY_LLAMA_SPECIAL_TOKENS",
    "build_tiny_llama",
    "build_tiny_llama_tokenizer",
    "save_tiny_llama",
]

#: Ten short, different prompts for mixed-batch checks (one request each, toggles vary per request):
#: the vLLM tests and the parallel benchmark compare the same requests across engines.
MIXED_BATCH_PROMPTS: tuple[str, ...] = (
    "The quick brown fox jumps over",
    "Once upon a time, in a land",
    "Harry looked at the castle and",
    "def add(a, b):\n    return",
    "The capital of France is",
    "My favourite colour is",
    "In 1969 the first men",
    "Water boils at a temperature of",
    "She opened the letter and read",
    "To be or not to be, that",
)

#: Special tokens, in id order (ids 0..4). Byte b follows at id 5 + b (ids 5..260).
TINY_LLAMA_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")

#: ChatML-style template: role markers are single special tokens, so hooks and tests can find
#: the assistant turn by id. BOS is written by the template (chat callers such as vLLM and
#: ``apply_chat_template`` tokenize with ``add_special_tokens=False``).
TINY_LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_llama_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (5 special tokens + 256 bytes = 261 ids) with a chat template.

    It is a real ``tokenizers`` BPE model with an empty merge list, wrapped in
    ``PreTrainedTokenizerFast`` so it saves as ``tokenizer.json`` and loads in transformers and
    vLLM like any hub tokenizer. Plain ``encode`` prepends ``<s>`` (Llama convention).
    """
    # Byte b gets id len(specials) + b, in the GPT-2 byte-to-unicode alphabet that the
    # ByteLevel pre-tokenizer emits.
    vocab = {tok: i for i, tok in enumerate(TINY_LLAMA_SPECIAL_TOKENS)}
    vocab.update({ch: len(vocab) + b for b, ch in sorted(bytes_to_unicode().items())})

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(TINY_LLAMA_SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=512,
        padding_side="left",  # batched generation with a decoder-only model pads on the left
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = TINY_LLAMA_CHAT_TEMPLATE
    return fast


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_key_value_heads: int = 1,
    intermediate_size: int,
    max_position_embeddings: int = 512,
    **extra: object,
) -> LlamaConfig:
    """The tiny Llama text config for ``tokenizer`` (shared by the tiny LM and the tiny VLM's text model)."""
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads}), "
            f"which must be divisible by num_key_value_heads ({num_key_value_heads})"
        )
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def greedy_generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy decoding with the tokenizer's special ids, so tests compare token for token."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )


def build_tiny_llama(
    seed: int = 0,
    *,
    num_layers: int = 4,
    hidden_size: int = 128,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
    initializer_range: float = 0.02,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Build a random tiny Llama and its tokenizer; the same seed gives bit-identical weights.

    The global torch RNG is forked, so calling this does not perturb the caller's random
    stream. ``hidden_size / num_attention_heads`` must be 64 (or another size vLLM's CPU
    attention supports) if the model is to be served by vLLM. The model is in eval mode, fp32.
    """
    tokenizer = build_tiny_llama_tokenizer()
    config = tiny_llama_config(
        tokenizer,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        dtype=torch.float32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = greedy_generation_config(tokenizer)
    return model.eval(), tokenizer


def save_tiny_llama(path: str | Path, seed: int = 0, **kwargs: int | float) -> Path:
    """Write ``build_tiny_llama(seed, **kwargs)`` as a HF directory and return its path.

    The directory holds ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
    tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``), so
    ``AutoModelForCausalLM.from_pretrained(path)`` and ``vllm.LLM(model=str(path))`` both load it.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_tiny_llama(seed, **kwargs)  # type: ignore[arg-type]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "erasekit-asset.json").write_text(json.dumps({"source": "erasekit.testing.tiny_llama", "seed": seed}))
    return out
