"""CGCE ``anchor_text`` on a tiny random SD pipeline: a flagged prompt is re-encoded with the words
naming what to draw instead, then refined; benign rows, ``prompt_embeds`` calls and bad packs behave."""

from __future__ import annotations

import functools

import pytest
import torch

from erasekit.errors import ErasekitError, PackError
from erasekit.integrations.diffusers import HOOK_NAME, _append, guard
from erasekit.integrations.diffusers_calibrate import calibrate_cgce
from erasekit.testing.diffusion_world.scenes import neutral_anchor_text
from tests._irece import red_concept
from tests.test_diffusers_guard import (
    BLUE,
    KW,
    RED,
    _gen,
    _with,
    first_conditioning,
    guarded_first_conditioning,
)


@pytest.fixture(scope="module")
def pack(pipe):
    return calibrate_cgce(pipe, red_concept())


def _encode(pipe, prompts):
    return pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]


def _run(pipe, pack, prompts, **kwargs):
    """Images, the conditioning the first cross-attention received, and the guard's report."""
    return guarded_first_conditioning(pipe, [pack], prompts, ["red"], **kwargs)


def test_flagged_row_starts_from_prompt_plus_anchor_text(pipe, pack):
    # max_steps=0: no refinement, so the conditioning is exactly where refinement would start
    _, cond, report = _run(pipe, _with(pack, anchor_text="green", max_steps=0), [RED, BLUE])
    assert report.flagged["red"] == [2] and report.anchored == {"red": [2]} and not report.anchor_text_skipped
    assert torch.equal(cond[2], _encode(pipe, [RED + " green", BLUE])[0])  # the call's prompts, one batch
    unguarded = _encode(pipe, [RED, BLUE])
    assert torch.equal(cond[3], unguarded[1])  # the benign prompt's row is untouched
    assert torch.equal(cond[0], cond[1])  # unconditional rows (empty prompt) are untouched


def test_anchor_text_changes_the_flagged_image_only(pipe, pack):
    baseline = pipe([RED, BLUE], generator=_gen(), **KW).images
    plain, _, _ = _run(pipe, pack, [RED, BLUE])
    anchored, _, report = _run(pipe, _with(pack, anchor_text="green"), [RED, BLUE])
    assert report.anchored == {"red": [2]} and report.refine_steps > 0
    assert not torch.equal(anchored[0], plain[0])
    assert torch.equal(anchored[1], baseline[1]) and torch.equal(plain[1], baseline[1])
    benign, _, report = _run(pipe, _with(pack, anchor_text="green"), [BLUE, BLUE])
    assert report.anchored == {} and torch.equal(benign, pipe([BLUE, BLUE], generator=_gen(), **KW).images)


def test_images_per_prompt_map_rows_onto_their_prompt(pipe, pack):
    _, cond, report = _run(pipe, _with(pack, anchor_text="green", max_steps=0), [BLUE, RED], num_images_per_prompt=2)
    assert report.anchored == {"red": [6, 7]}  # CFG rows: 4 uncond, then BLUE, BLUE, RED, RED
    expected = _encode(pipe, [BLUE, RED + " green"])[1]  # once per prompt, as the pipeline encodes
    assert torch.equal(cond[6], expected) and torch.equal(cond[7], expected)


def test_re_encoding_runs_once_per_prompt_not_per_image(pipe, pack, monkeypatch):
    seen: list[list[str]] = []
    original = pipe.encode_prompt

    @functools.wraps(original)  # the guard reads encode_prompt's signature
    def spy(*args, **kwargs):
        seen.append(list(kwargs.get("prompt") or args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", spy)
    _, _, report = _run(pipe, _with(pack, anchor_text="green", max_steps=0), [BLUE, RED], num_images_per_prompt=3)
    assert report.anchored == {"red": [9, 10, 11]}
    assert seen[-1] == [BLUE, RED + " green"]


def test_images_of_one_prompt_flagged_differently_are_encoded_per_image(pipe, pack, monkeypatch):
    """Images of one prompt share its conditioning, so they are flagged alike; should a classifier ever
    split them, each image row is re-encoded with its own texts rather than borrowing its sibling's."""
    with first_conditioning(pipe) as seen, guard(pipe, [_with(pack, anchor_text="green", max_steps=0)]) as g:
        clf = g._classifiers["red"]
        real = clf.scores
        # CFG rows: 4 uncond, then BLUE, BLUE, RED, RED; flag only the second RED image
        monkeypatch.setattr(clf, "scores", lambda e: real(e) * [0, 0, 0, 0, 0, 0, 0, 1])
        g([BLUE, RED], generator=_gen(), erase=["red"], num_images_per_prompt=2, **KW)
        assert g.last_report.anchored == {"red": [7]}
    expected = _encode(pipe, [BLUE, BLUE, RED, RED + " green"])
    assert torch.equal(seen[0][7], expected[3])
    assert torch.equal(seen[0][6], _encode(pipe, [BLUE, RED])[1])  # its unflagged sibling: the pipeline's row


def test_anchor_text_dtype_runs_the_re_encoding_in_that_precision(pipe, pack):
    anchored = _with(pack, anchor_text="green", max_steps=0)
    _, cond, report = guarded_first_conditioning(pipe, [anchored], [RED, BLUE], ["red"],
                                                 guard_kwargs={"anchor_text_dtype": "bfloat16"})
    assert report.anchored == {"red": [2]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _encode(pipe, [RED + " green", BLUE])
    assert cond.dtype == torch.float32 and torch.equal(cond[2], low[0].float())
    exact = _encode(pipe, [RED + " green", BLUE])[0]
    assert not torch.equal(cond[2], exact)
    torch.testing.assert_close(cond[2], exact, atol=0.1, rtol=0.05)  # bf16 rounding, not another prompt
    assert torch.equal(cond[3], _encode(pipe, [RED, BLUE])[1])  # benign rows: the pipeline's own encoding


def test_anchor_text_dtype_leaves_benign_calls_bit_identical(pipe, pack):
    baseline = pipe([BLUE, BLUE], generator=_gen(), **KW).images
    with guard(pipe, [_with(pack, anchor_text="green")], anchor_text_dtype=torch.bfloat16) as g:
        out = g([BLUE, BLUE], generator=_gen(), erase=["red"], **KW).images
        assert g.last_report.anchored == {}
    assert torch.equal(out, baseline)


@pytest.mark.parametrize("value", ["bf16", torch.int8, 16])
def test_bad_anchor_text_dtype_refused_naming_the_field(pipe, pack, value):
    with pytest.raises(ErasekitError, match="anchor_text_dtype"):
        guard(pipe, [pack], anchor_text_dtype=value)
    registry = getattr(pipe.unet, "_diffusers_hook", None)
    assert registry is None or registry.get_hook(HOOK_NAME) is None  # refused before anything attached


def test_anchored_row_does_not_depend_on_which_neighbours_are_flagged(pipe, pack):
    other = "a red heart on a black background"
    anchored = _with(pack, anchor_text="green", max_steps=0)
    with guard(pipe, [anchored]) as g:
        rows = []
        for erase in ([["red"], ["red"]], [["red"], []]):
            with first_conditioning(pipe) as seen:
                g([RED, other], generator=_gen(), erase=erase, **KW)
            rows.append((seen[0][2], g.last_report.anchored["red"]))
    assert rows[0][1] == [2, 3] and rows[1][1] == [2]
    assert torch.equal(rows[0][0], rows[1][0])


def test_prompt_embeds_call_is_refined_without_anchor_text_and_says_so(pipe, pack):
    embeds, negative = pipe.encode_prompt([RED, BLUE], "cpu", 1, True)
    kwargs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    with guard(pipe, [pack]) as g:
        plain = g(generator=_gen(), erase=["red"], **kwargs, **KW).images
    with guard(pipe, [_with(pack, anchor_text="green")]) as g:
        out = g(generator=_gen(), erase=["red"], **kwargs, **KW).images
        report = g.last_report
    assert report.anchor_text_skipped == ["red"] and report.anchored == {}
    assert torch.equal(out, plain)


@pytest.mark.parametrize("value", [123, "", "   ", "x" * 301, ["green"]])
def test_bad_anchor_text_refused_naming_the_field(pack, value):
    with pytest.raises(PackError, match="hyperparameters.anchor_text"):
        _with(pack, anchor_text=value)


def test_calibration_accepts_anchor_text_and_the_pack_round_trips(tmp_path, pipe):
    pack = calibrate_cgce(pipe, red_concept(), anchor_text="green")
    assert pack.hyperparameters["anchor_text"] == "green"
    from erasekit.guardrails.pack import ConceptPack

    assert ConceptPack.from_pretrained(pack.save_pretrained(tmp_path / "red")).hyperparameters["anchor_text"] == "green"
    with pytest.raises(ErasekitError, match="anchor_txt"):
        calibrate_cgce(pipe, red_concept(), anchor_txt="green")


def test_append_spaces_words_but_not_punctuation():
    assert _append("a cat", ["wearing a hat"]) == "a cat wearing a hat"
    assert _append("a person", [", fully clothed", "smiling"]) == "a person, fully clothed smiling"
    assert _append("a dot", [" with a plain fill"]) == "a dot with a plain fill"


def test_world_names_a_neutral_value_only_where_its_family_has_one():
    assert neutral_anchor_text("dots") == neutral_anchor_text("stripes") == "with a plain fill"
    assert neutral_anchor_text("plain") is None  # the neutral value itself
    assert neutral_anchor_text("circle") is None and neutral_anchor_text("red") is None
    with pytest.raises(KeyError, match="unknown world concept"):
        neutral_anchor_text("zebra")


def test_call_encoding_options_reach_the_re_encoding(pipe, pack, monkeypatch):
    """The LoRA ``scale`` (like ``clip_skip``) changes what ``encode_prompt`` returns: the re-encoding gets it too.
    (Neither can run for real here: diffusers' SD clip-skip and non-PEFT LoRA paths read
    ``text_encoder.text_model``, which transformers 5's ``CLIPTextModel`` no longer has, guarded or not;
    the spy records what the guard passes and drops the scale.)"""
    seen: list[dict] = []
    original = pipe.encode_prompt

    @functools.wraps(original)  # the guard reads encode_prompt's signature
    def spy(*args, **kwargs):
        seen.append(dict(kwargs))
        kwargs.pop("lora_scale", None)  # diffusers' non-PEFT LoRA scaling needs text_model too (see above)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", spy)
    _, _, report = _run(pipe, _with(pack, anchor_text="green"), [RED, BLUE], cross_attention_kwargs={"scale": 0.5})
    anchored = [k for k in seen if k.get("prompt") == [RED + " green", BLUE]]
    assert report.anchored == {"red": [2]} and len(anchored) == 1
    assert anchored[0]["lora_scale"] == 0.5 and "clip_skip" not in anchored[0]
    assert anchored[0]["do_classifier_free_guidance"] is False and anchored[0]["num_images_per_prompt"] == 1
