"""Per-request toggles on a vision-language model served by vLLM, with an image in every prompt.

The model is a tiny random Idefics3 (SigLIP-style vision tower, pixel-shuffle connector,
4-layer Llama text model; :mod:`erasekit.testing.tiny_vlm`), built offline. LLaVA itself cannot
be served by this vLLM-CPU install (its vLLM module needs torchvision); Idefics3 is the same
"vision features spliced into a Llama" design and its image processor has a PIL backend.

One erasekit engine (module scope), torch.compile on (vLLM's default), prefix caching on, up to
two images per prompt. Packs: two ``add_vector`` concepts (layer 1 all tokens, layer 2 prefill
only), an MLLMEraser pack calibrated on the VLM with text prompts (``mllm``) and one calibrated
on image prompts (``mllm_img``: red-square images vs plain-noise images, transformers
calibrator with ``inputs=``), both in a fresh interpreter. Oracles: the same engine with no
toggles, the unguarded transformers model (which gives the same tokens as plain vLLM, asserted
below), the transformers guard with the same packs, same prompt and same images, and, for the
prefix cache, the same request with a fresh ``cache_salt`` (computed from scratch).
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


#: Two images per prompt, mixed toggles, one batch: (question, image seeds, toggle).
MULTI = [
    ("Compare the two pictures.", (20, 21), None),
    ("Compare the two pictures.", (22, 23), ["alpha"]),
    ("Which picture has the red square higher?", (24, 25), "beta,mllm"),
    ("Describe both images.", (26, 27), None),
    ("Describe both images.", (28, 29), ["mllm"]),
]
#: Image-calibrated pack served in vLLM: (question, image seed, red square?, toggle).
IMAGE_PACK = [
    ("What is in this picture?", 40, True, None),
    ("What is in this picture?", 40, True, ["mllm_img"]),
    ("Describe the colours of the image.", 41, True, ["mllm_img"]),
    ("Describe the colours of the image.", 42, False, ["mllm_img"]),
    ("Write a caption for this image.", 43, True, "mllm_img,alpha"),
    ("Write a caption for this image.", 44, False, None),
]
N_CALIBRATION = 8


def _prompt(question: str, n_images: int = 1) -> str:
    # The tokenizer adds <s>; <image> is expanded by the processor (vLLM and transformers alike).
    return f"<|im_start|>user\n{'<image>' * n_images}{question}<|im_end|>\n<|im_start|>assistant\n"


def _image(i: int, square: bool = True):
    from PIL import Image

    from erasekit.testing.tiny_vlm import IMAGE_SIZE

    rng = np.random.RandomState(i)
    pixels = (rng.rand(IMAGE_SIZE, IMAGE_SIZE, 3) * 255).astype("uint8")
    if square:  # a red square, a different place per image
        top = 8 + 4 * (i % 8)
        pixels[top: top + 24, 8:40] = (220, 30, 30)
    return Image.fromarray(pixels)


def _image_calibration_sets(image_dir) -> dict[str, list[dict]]:
    """Forget: questions on red-square images; retain: the same questions on plain-noise images;
    erasure: the forget prompts followed by the refusal target (the calibrator's text default)."""
    from erasekit.integrations.transformers_calibrate import DEFAULT_TARGET

    image_dir.mkdir(parents=True, exist_ok=True)
    sets: dict[str, list[dict]] = {"forget": [], "retain": [], "erasure": []}
    for k in range(N_CALIBRATION):
        question = QUESTIONS[k % len(QUESTIONS)]
        red, noise = image_dir / f"red{k}.png", image_dir / f"noise{k}.png"
        _image(100 + k).save(red)  # PNG: lossless, the subprocess reads back these exact pixels
        _image(200 + k, square=False).save(noise)
        sets["forget"].append({"text": _prompt(question), "images": [str(red)]})
        sets["retain"].append({"text": _prompt(question), "images": [str(noise)]})
        sets["erasure"].append({"text": _prompt(question) + DEFAULT_TARGET, "images": [str(red)]})
    return sets


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
        "image_packs": {"mllm_img": ["mllmeraser", {"strength": -4.0}, _image_calibration_sets(root / "images")]},
    })
    policy = json.loads(world.policy_path.read_text())
    for name in ("mllm", "mllm_img"):
        policy["concepts"][name] = {"pack": paths[name], "mandatory": False}
    world.policy_path.write_text(json.dumps(policy, indent=2))
    return world


@pytest.fixture(scope="module")
def engine(world):
    from vllm import LLM

    llm = LLM(model=str(world.model_dir), dtype="float32", max_model_len=512, gpu_memory_utilization=0.2,
              seed=0, limit_mm_per_prompt={"image": 2}, enable_prefix_caching=True,
              additional_config={"erasekit": {"policy": str(world.policy_path)}})
    yield llm
    llm.llm_engine.engine_core.shutdown()


def _params(toggle):
    from vllm import SamplingParams

    # min_tokens masks end-of-sequence like transformers' min_new_tokens (ignore_eos alone does not).
    return SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                          extra_args={"erase": toggle} if toggle is not None else None)


def _run(llm, cases, toggles):
    """``cases``: (prompt, [images]) per request; all requests in one ``generate`` call (one batch)."""
    requests = [{"prompt": prompt, "multi_modal_data": {"image": images[0] if len(images) == 1 else images}}
                for prompt, images in cases]
    outs = llm.generate(requests, [_params(t) for t in toggles], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [list(o.prompt_token_ids) for o in outs]


@pytest.fixture(scope="module")
def hf_oracle(world):
    """``oracle(cases, toggles)``: transformers greedy tokens per request, unguarded and under the
    guard with the request's toggle, plus the processor's prompt ids (one request at a time)."""
    from transformers import AutoProcessor

    from erasekit.integrations.transformers import TransformersGuard
    from erasekit.integrations.vllm_testing import load_hf_lm

    model = load_hf_lm(world.model_dir)
    processor = AutoProcessor.from_pretrained(world.model_dir)

    def oracle(cases, toggles):
        plain, guarded, prompt_ids = [], {}, []
        with TransformersGuard(model, policy=str(world.policy_path), tokenizer=processor.tokenizer) as guard:
            for i, ((prompt, images), toggle) in enumerate(zip(cases, toggles, strict=True)):
                inputs = processor(text=prompt, images=images, return_tensors="pt")
                n = inputs["input_ids"].shape[1]
                prompt_ids.append(inputs["input_ids"][0].tolist())
                kw = {"max_new_tokens": MAX_TOKENS, "min_new_tokens": MAX_TOKENS, "do_sample": False}
                with torch.inference_mode():
                    plain.append(guard.generate(**inputs, **kw)[0, n:].tolist())
                    if toggle is not None:
                        guarded[i] = guard.generate(**inputs, erase=toggle, **kw)[0, n:].tolist()
        return plain, guarded, prompt_ids

    return oracle


@pytest.fixture(scope="module")
def transformers_oracle(hf_oracle):
    return hf_oracle([(_prompt(q), [_image(i)]) for i, q in enumerate(QUESTIONS)], TOGGLES)


def _check_mixed_batch(engine, cases, toggles, oracle):
    """Serve ``cases`` twice, untoggled and with ``toggles`` (one batch each). vLLM and transformers
    see the same expanded prompt ids and, unguarded, give the same greedy tokens (so transformers
    is a valid oracle); with toggles, untoggled requests == the untoggled run and toggled requests
    == the transformers guard. Returns (toggled run, untoggled run)."""
    plain_hf, guarded_hf, prompt_ids_hf = oracle
    reference, prompt_ids = _run(engine, cases, [None] * len(cases))
    assert prompt_ids == prompt_ids_hf
    assert reference == plain_hf, "unguarded vLLM and transformers disagree on the tiny VLM"
    got, _ = _run(engine, cases, toggles)  # all requests in one batch, mixed toggles
    for i, (toggle, tokens, ref) in enumerate(zip(toggles, got, reference, strict=True)):
        if toggle is None:
            assert tokens == ref, f"untoggled request {i} changed by its neighbours' toggles"
        else:
            assert tokens == guarded_hf[i], f"request {i} ({toggle!r}) differs from the transformers guard"
    return got, reference


def test_vlm_mixed_toggles_with_images(engine, transformers_oracle):
    from vllm.config import CompilationMode

    assert engine.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
    cases = [(_prompt(q), [_image(i)]) for i, q in enumerate(QUESTIONS)]
    got, reference = _check_mixed_batch(engine, cases, TOGGLES, transformers_oracle)
    for i, (toggle, tokens, ref) in enumerate(zip(TOGGLES, got, reference, strict=True)):
        if toggle is not None:
            # Fails if the edit were traced away by torch.compile (tokens would equal ref).
            assert tokens != ref, f"toggle {toggle!r} had no effect on request {i}"
    image_token = engine.get_tokenizer().convert_tokens_to_ids("<image>")
    assert all(ids.count(image_token) > 0 for ids in transformers_oracle[2]), "the image never reached the prompt"


def test_vlm_two_images_per_prompt_mixed_toggles(engine, hf_oracle):
    """Two images in every prompt (``limit_mm_per_prompt={"image": 2}``), mixed toggles, one batch."""
    from erasekit.testing.tiny_vlm import IMAGE_SEQ_LEN

    cases = [(_prompt(q, len(seeds)), [_image(k) for k in seeds]) for q, seeds, _ in MULTI]
    toggles = [t for *_, t in MULTI]
    oracle = hf_oracle(cases, toggles)
    got, reference = _check_mixed_batch(engine, cases, toggles, oracle)
    image_token = engine.get_tokenizer().convert_tokens_to_ids("<image>")
    assert all(ids.count(image_token) == 2 * IMAGE_SEQ_LEN for ids in oracle[2]), "not two images per prompt"
    for i, (toggle, tokens, ref) in enumerate(zip(toggles, got, reference, strict=True)):
        if toggle is not None:
            assert tokens != ref, f"toggle {toggle!r} had no effect on two-image request {i}"
    # Both images reach the model: the second image alone changes the output (same question, same
    # first image), so a prompt that dropped or duplicated an image would not match transformers.
    (prompt, (first, _)), other = cases[0], _image(30)
    swapped, _ = _run(engine, [(prompt, [first, other])], [None])
    assert swapped[0] != reference[0], "the second image does not influence the output"


def test_prefix_cache_keeps_images_apart(engine):
    """Identical text, different images, same toggle: the second request must not reuse the first
    one's KV (vLLM puts the image hash in the block hashes; erasekit's salt is equal for both, as the
    prompt ids are), nor KV computed without the toggle. Identical requests must hit the cache."""
    text = " ".join(["Look closely at every corner of this picture and say what you see."] * 4)
    prompt = _prompt(text)
    a, b = _image(31), _image(32)

    def run(image, toggle, salt=None):
        request = {"prompt": prompt, "multi_modal_data": {"image": image}}
        if salt is not None:
            request["cache_salt"] = salt
        out = engine.generate([request], [_params(toggle)], use_tqdm=False)[0]
        return list(out.outputs[0].token_ids), out.num_cached_tokens or 0, list(out.prompt_token_ids)

    plain_a, _, ids = run(a, None)
    first_image = ids.index(engine.get_tokenizer().convert_tokens_to_ids("<fake_token_around_image>"))
    assert len(ids) > 200 and first_image < 16, "the prompt should span many blocks after the image"
    plain_a2, hit, _ = run(a, None)
    assert hit > first_image, "prefix cache was not hit for an identical plain request: the test proves nothing"
    assert plain_a2 == plain_a
    plain_b, cached, _ = run(b, None)
    fresh_plain_b = run(b, None, salt="fresh-plain")[0]  # computed from scratch
    assert fresh_plain_b != plain_a, "the two images give the same output: reuse could not be detected"
    assert plain_b == fresh_plain_b, "plain image-B request differs from a from-scratch run"
    assert cached <= first_image, f"plain request with image B reused {cached} tokens of image A's KV"
    for toggle in (["alpha"], ["mllm"]):
        steered_a, cached, _ = run(a, toggle)
        assert steered_a == run(a, toggle, salt=f"fresh-a-{toggle[0]}")[0], f"{toggle}: differs from scratch"
        assert cached == 0, f"{toggle}: steered request reused {cached} tokens of unsteered KV"
        steered_a2, hit, _ = run(a, toggle)
        assert hit > first_image and steered_a2 == steered_a, f"{toggle}: identical steered request missed the cache"
        steered_b, cached, _ = run(b, toggle)
        fresh_b = run(b, toggle, salt=f"fresh-{toggle[0]}")[0]
        assert fresh_b != steered_a, f"{toggle}: both images give the same steered output"
        assert steered_b == fresh_b, f"{toggle}: steered image-B request differs from the same request from scratch"
        assert cached <= first_image, f"{toggle}: steered request with image B reused {cached} tokens of image A"
        assert steered_b != plain_b, f"{toggle} had no effect"


def test_image_calibrated_pack_matches_transformers_guard(engine, hf_oracle):
    """An MLLMEraser pack calibrated on image prompts (``mllm_img``), served in vLLM next to
    untoggled requests: toggled == transformers guard with the same image, token for token."""
    cases = [(_prompt(q), [_image(k, square=red)]) for q, k, red, _ in IMAGE_PACK]
    toggles = [t for *_, t in IMAGE_PACK]
    got, reference = _check_mixed_batch(engine, cases, toggles, hf_oracle(cases, toggles))
    changed = [i for i, (t, g, r) in enumerate(zip(toggles, got, reference, strict=True)) if t is not None and g != r]
    red_toggled = [i for i, (*_, red, t) in enumerate(IMAGE_PACK) if red and t is not None]
    assert set(red_toggled) <= set(changed), f"the image pack had no effect on red-square requests {red_toggled}"


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
