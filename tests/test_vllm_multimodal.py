"""Per-request toggles on a vision-language model served by vLLM, with an image in every prompt.

The model is a tiny random Idefics3 (SigLIP-style vision tower, pixel-shuffle connector,
4-layer Llama text model; :mod:`erasekit.testing.tiny_vlm`), built offline. LLaVA itself cannot
be served by this vLLM-CPU install (its vLLM module needs torchvision); Idefics3 is the same
"vision features spliced into a Llama" design and its image processor has a PIL backend.

One erasekit engine (module scope), torch.compile on (vLLM's default). Packs: two ``add_vector``
concepts (layer 1 all tokens, layer 2 prefill only) and an MLLMEraser pack calibrated on the
VLM (text prompts, transformers calibrator, in a fresh interpreter). Oracles: the same engine
with no toggles, the unguarded transformers model (which gives the same tokens as plain vLLM,
asserted below) and the transformers guard with the same packs, same prompt and same image.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

QUESTIONS = [
    "What is in this picture?",
    "Describe the colours of the image.",
    "Is there a cat in the photo?",
    "Write a caption for this image.",
    "What is in this picture?",
    "How many objects are shown?",
]
#: One toggle per request (None = untoggled); requests 0 and 4 share the question, not the image.
TOGGLES = [None, ["alpha"], None, "beta,mllm", ["mllm"], None]
MAX_TOKENS = 10
FORGET = ["Tell me about the red square.", "What colour is the red square?", "Where is the red square?",
          "Describe the red square in the picture.", "Is the red square large?", "Why is the square red?"]
RETAIN = ["What is the capital of Italy?", "How do plants grow?", "Who wrote Hamlet?",
          "What is two plus two?", "Name a large ocean.", "What is the weather like today?"]


def _prompt(question: str) -> str:
    # The tokenizer adds <s>; <image> is expanded by the processor (vLLM and transformers alike).
    return f"<|im_start|>user\n<image>{question}<|im_end|>\n<|im_start|>assistant\n"


def _image(i: int):
    from PIL import Image

    from erasekit.testing.tiny_vlm import IMAGE_SIZE

    rng = np.random.RandomState(i)
    pixels = (rng.rand(IMAGE_SIZE, IMAGE_SIZE, 3) * 255).astype("uint8")
    pixels[8 + 4 * i: 32 + 4 * i, 8:40] = (220, 30, 30)  # a red square, a different place per image
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from erasekit.integrations.vllm_testing import calibrate_packs_in_subprocess, write_world
    from erasekit.testing.tiny_vlm import tiny_vlm_dir

    root = tmp_path_factory.mktemp("vllm_multimodal")
    model_dir = tiny_vlm_dir(seed=0)
    world = write_world(root, model_dir=model_dir,
                        concepts={"alpha": {"layers": [1]}, "beta": {"layers": [2], "phases": ["prefill"]}})
    # Fresh interpreter: a vLLM engine earlier in this session breaks batched torch.linalg.solve.
    paths = calibrate_packs_in_subprocess({
        "model_dir": str(model_dir), "out_dir": str(root / "calibrated"), "forget": FORGET, "retain": RETAIN,
        "packs": {"mllm": ["mllmeraser", {"strength": -4.0}]},
    })
    policy = json.loads(world.policy_path.read_text())
    policy["concepts"]["mllm"] = {"pack": paths["mllm"], "mandatory": False}
    world.policy_path.write_text(json.dumps(policy, indent=2))
    return world


@pytest.fixture(scope="module")
def engine(world):
    from vllm import LLM

    llm = LLM(model=str(world.model_dir), dtype="float32", max_model_len=512, gpu_memory_utilization=0.2,
              seed=0, limit_mm_per_prompt={"image": 1},
              additional_config={"erasekit": {"policy": str(world.policy_path)}})
    yield llm
    llm.llm_engine.engine_core.shutdown()


def _generate(llm, toggles):
    from vllm import SamplingParams

    requests = [{"prompt": _prompt(q), "multi_modal_data": {"image": _image(i)}} for i, q in enumerate(QUESTIONS)]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                             extra_args={"erase": t} if t is not None else None) for t in toggles]
    outs = llm.generate(requests, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [list(o.prompt_token_ids) for o in outs]


@pytest.fixture(scope="module")
def transformers_oracle(world):
    """Greedy tokens per request: unguarded, and under the guard with the request's toggle."""
    from transformers import AutoProcessor

    from erasekit.integrations.transformers import TransformersGuard
    from erasekit.integrations.vllm_testing import load_hf_lm

    model = load_hf_lm(world.model_dir)
    processor = AutoProcessor.from_pretrained(world.model_dir)
    plain, guarded, prompt_ids = [], {}, []
    with TransformersGuard(model, policy=str(world.policy_path), tokenizer=processor.tokenizer) as guard:
        for i, (question, toggle) in enumerate(zip(QUESTIONS, TOGGLES, strict=True)):
            inputs = processor(text=_prompt(question), images=[_image(i)], return_tensors="pt")
            n = inputs["input_ids"].shape[1]
            prompt_ids.append(inputs["input_ids"][0].tolist())
            kw = {"max_new_tokens": MAX_TOKENS, "min_new_tokens": MAX_TOKENS, "do_sample": False}
            with torch.inference_mode():
                plain.append(guard.generate(**inputs, **kw)[0, n:].tolist())
                if toggle is not None:
                    guarded[i] = guard.generate(**inputs, erase=toggle, **kw)[0, n:].tolist()
    return plain, guarded, prompt_ids


def test_vlm_mixed_toggles_with_images(engine, transformers_oracle):
    from vllm.config import CompilationMode

    assert engine.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
    plain_hf, guarded_hf, prompt_ids_hf = transformers_oracle
    reference, prompt_ids = _generate(engine, [None] * len(QUESTIONS))
    # vLLM and transformers see the same expanded prompt (image tokens included) and, unguarded,
    # produce the same greedy tokens: transformers is a valid oracle for this model.
    assert prompt_ids == prompt_ids_hf
    assert reference == plain_hf, "unguarded vLLM and transformers disagree on the tiny VLM"
    got, _ = _generate(engine, TOGGLES)  # all requests in one batch, mixed toggles
    for i, (toggle, tokens, ref) in enumerate(zip(TOGGLES, got, reference, strict=True)):
        if toggle is None:
            assert tokens == ref, f"untoggled request {i} changed by its neighbours' toggles"
        else:
            # Fails if the edit were traced away by torch.compile (tokens would equal ref).
            assert tokens == guarded_hf[i], f"request {i} ({toggle!r}) differs from the transformers guard"
            assert tokens != ref, f"toggle {toggle!r} had no effect on request {i}"
    image_token = engine.get_tokenizer().convert_tokens_to_ids("<image>")
    assert all(ids.count(image_token) > 0 for ids in prompt_ids), "the image never reached the prompt"


def test_pack_for_another_vlm_refuses_to_start(tmp_path, world, capfd):
    """Packs from another random tiny VLM (same shapes, other weights) must stop the engine.

    This is the embedding-hash part of the fingerprint: it proves the worker hashed the *text*
    embedding of the served VLM (a missing hash would be skipped, and this engine would start).
    """
    from vllm import LLM

    from erasekit.integrations.vllm_testing import write_world
    from erasekit.testing.tiny_vlm import tiny_vlm_dir

    other = write_world(tmp_path / "other", model_dir=tiny_vlm_dir(seed=1))
    with pytest.raises(Exception, match="initialization failed|embedding_sha256"):
        LLM(model=str(world.model_dir), dtype="float32", max_model_len=256, gpu_memory_utilization=0.2,
            enforce_eager=True, limit_mm_per_prompt={"image": 1},
            additional_config={"erasekit": {"policy": str(other.policy_path)}})
    out, err = capfd.readouterr()  # the worker's error goes to the inherited stderr
    assert "model_fingerprint.embedding_sha256" in out + err, "the engine failed for another reason"
