"""CGCE negative guidance: flagged rows' unconditional CFG embedding -> the concept's own encoding; nothing else moves."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from erasekit.errors import PackError
from erasekit.guardrails.concept import Concept
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.diffusers import HOOK_NAME, guard
from erasekit.integrations.diffusers_calibrate import (
    add_negative_embedding,
    calibrate_cgce,
    encode_conditioning,
)
from tests._irece import red_concept
from tests.test_diffusers_guard import (
    BLUE,
    KW,
    RED,
    SHAPES,
    _gen,
    _with,
    first_conditioning,
    guarded_first_conditioning,
)


@pytest.fixture(scope="module")
def pack(pipe):
    return calibrate_cgce(pipe, red_concept())


def _run(pipe, packs, prompts, erase, **kw):
    """Images and the conditioning the first cross-attention really received at the first step."""
    return guarded_first_conditioning(pipe, packs, prompts, erase, **kw)


def test_pack_stores_the_concept_encoding_and_defaults_off(pipe, pack):
    assert pack.hyperparameters["negative_guidance"] == 0 and pack.hyperparameters["negative_prompt"] == "red"
    torch.testing.assert_close(pack.tensors["negative_embedding"], encode_conditioning(pipe, ["red"])[0])


def test_flagged_row_uncond_replaced_benign_row_bit_identical(pipe, pack):
    off_img, off_cond, _ = _run(pipe, [pack], [RED, BLUE], ["red"])
    on_img, on_cond, report = _run(pipe, [_with(pack, negative_guidance=True)], [RED, BLUE], ["red"])
    # CFG batch [uncond RED, uncond BLUE, cond RED, cond BLUE]: only RED is flagged
    assert report.flagged["red"] == [2] and report.negative_guided == [0]
    assert torch.equal(on_cond[0], pack.tensors["negative_embedding"])
    assert not torch.equal(off_cond[0], on_cond[0])
    assert torch.equal(on_cond[1:], off_cond[1:])  # benign uncond row and both cond rows (refined as before)
    assert torch.equal(on_img[1], off_img[1])  # the benign image is bit-identical
    assert not torch.equal(on_img[0], off_img[0])


def test_no_cfg_and_no_erase_are_no_ops(pipe, pack):
    on = [_with(pack, negative_guidance=True)]
    off_img, off_cond, _ = _run(pipe, [pack], [RED, BLUE], ["red"], guidance_scale=1.0)
    on_img, on_cond, report = _run(pipe, on, [RED, BLUE], ["red"], guidance_scale=1.0)
    assert on_cond.shape[0] == 2 and report.flagged["red"] == [0] and report.negative_guided == []
    assert torch.equal(on_img, off_img) and torch.equal(on_cond, off_cond)
    plain = pipe([RED, BLUE], generator=_gen(), **KW).images
    assert torch.equal(_run(pipe, on, [RED, BLUE], [])[0], plain)


def test_user_negative_prompt_embeds_replaced_only_on_flagged_rows(pipe, pack):
    embeds, negative = pipe.encode_prompt([RED, BLUE], "cpu", 1, True, negative_prompt=["blurry", "blurry"])
    with first_conditioning(pipe) as seen, guard(pipe, [_with(pack, negative_guidance=True)]) as g:
        g(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=_gen(), erase=["red"], **KW)
    assert torch.equal(seen[0][0], pack.tensors["negative_embedding"])
    assert torch.equal(seen[0][1], negative[1])


def test_two_flagged_concepts_on_one_row_average_their_negatives(pipe, pack):
    other = add_negative_embedding(pipe, dataclasses.replace(pack, concept=dataclasses.replace(pack.concept,
                                                                                              name="crimson")), "scarlet")
    packs = [_with(pack, negative_guidance=True), _with(other, negative_guidance=True)]
    _, cond, report = _run(pipe, packs, [RED, BLUE], ["red", "crimson"])
    assert report.negative_guided == [0]
    mean = (pack.tensors["negative_embedding"] + other.tensors["negative_embedding"]) / 2
    torch.testing.assert_close(cond[0], mean, rtol=0, atol=1e-6)


def test_negative_embedding_round_trip_and_rejections(tmp_path, pack):
    on = _with(pack, negative_guidance=True)
    loaded = ConceptPack.from_pretrained(on.save_pretrained(tmp_path / "p"))
    assert loaded.hyperparameters["negative_guidance"] is True
    assert torch.equal(loaded.tensors["negative_embedding"], pack.tensors["negative_embedding"])
    assert loaded.manifest_summary()["tensors"]["negative_embedding"]["shape"] == list(
        pack.tensors["negative_embedding"].shape)
    bad = pack.tensors["negative_embedding"].clone()
    bad[0, 0] = float("nan")
    cases = [
        (dataclasses.replace(on, tensors={**on.tensors, "negative_embedding": bad}), "tensors.negative_embedding"),
        (dataclasses.replace(on, tensors={**on.tensors, "negative_embedding": bad[1:].nan_to_num()}),
         "tensors.negative_embedding"),
        (dataclasses.replace(on, tensors={k: v for k, v in on.tensors.items() if k != "negative_embedding"}),
         "hyperparameters.negative_guidance"),
        (dataclasses.replace(on, hyperparameters={**on.hyperparameters, "negative_guidance": 2}),
         "hyperparameters.negative_guidance"),
    ]
    for broken, field in cases:
        with pytest.raises(PackError) as err:
            broken.validate()
        assert err.value.field == field and err.value.fix
    # the NaN is refused on load from disk too
    path = dataclasses.replace(pack, tensors={**pack.tensors, "negative_embedding": bad})
    with pytest.raises(PackError):
        path.save_pretrained(tmp_path / "nan")
        ConceptPack.from_pretrained(tmp_path / "nan")
    # packs written before the tensor existed still load, negative guidance off
    old = dataclasses.replace(pack, tensors={k: v for k, v in pack.tensors.items() if k != "negative_embedding"},
                              hyperparameters={k: v for k, v in pack.hyperparameters.items()
                                               if k not in ("negative_guidance", "negative_prompt")})
    old.validate()


def test_negative_guidance_with_irece_refused_nothing_attached(pipe, pack):
    """IRECE's text cut copies the unconditional branch, which negative guidance makes the concept:
    the combination is refused up front, before any hook or processor is installed."""
    from erasekit.integrations.diffusers_calibrate import calibrate_irece

    concept = Concept("blue", forget=[f"a blue {s} on a white background" for s in SHAPES],
                      retain=[f"a green {s} on a white background" for s in SHAPES], keywords=["blue"])
    irece = calibrate_irece(pipe, concept, n_prompts=4, threshold=0.0, end=1.0,
                            call_kwargs={"num_inference_steps": 2, "height": 32, "width": 32})
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(PackError, match="cannot be combined with IRECE") as info:
        guard(pipe, [_with(pack, negative_guidance=1), irece])
    assert info.value.field == "hyperparameters.negative_guidance"
    assert dict(pipe.unet.attn_processors) == processors
    registry = getattr(pipe.unet, "_diffusers_hook", None)
    assert registry is None or registry.get_hook(HOOK_NAME) is None
    with guard(pipe, [pack, irece]):  # negative guidance off: the same packs guard together
        pass


# ---------------------------------------------------------------- negative_source: refinement
def test_refinement_source_uncond_moves_by_what_refinement_removed(pipe, pack):
    off_img, off_cond, _ = _run(pipe, [pack], [RED, BLUE], ["red"])
    delta = _with(pack, negative_guidance=True, negative_source="refinement")
    on_img, on_cond, report = _run(pipe, [delta], [RED, BLUE], ["red"])
    # CFG batch [uncond RED, uncond BLUE, cond RED, cond BLUE]: only RED is flagged
    assert report.flagged["red"] == [2] and report.negative_guided == [0]
    original = pipe.encode_prompt([RED], "cpu", 1, True)  # (cond, uncond) before any refinement
    removed = original[0][0] - off_cond[2]  # what refinement took out of RED's conditional row
    assert removed.abs().max() > 0
    torch.testing.assert_close(on_cond[0], original[1][0] + removed)
    assert torch.equal(on_cond[1:], off_cond[1:])  # benign uncond row and both cond rows as without it
    assert torch.equal(on_img[1], off_img[1]) and not torch.equal(on_img[0], off_img[0])
    # needs no negative_embedding tensor; an unknown source is refused naming the field
    bare = dataclasses.replace(delta, tensors={k: v for k, v in delta.tensors.items() if k != "negative_embedding"})
    bare.validate()
    with pytest.raises(PackError) as err:
        _with(pack, negative_guidance=True, negative_source="prompt").validate()
    assert err.value.field == "hyperparameters.negative_source" and "refinement" in err.value.fix


def test_refinement_source_without_refinement_guides_nothing(pipe, pack):
    """max_steps=0 flags but moves nothing: no displacement to guide by, so the uncond row and the report stay put."""
    off_img, off_cond, _ = _run(pipe, [_with(pack, max_steps=0)], [RED, BLUE], ["red"])
    on_img, on_cond, report = _run(pipe, [_with(pack, max_steps=0, negative_guidance=True,
                                                negative_source="refinement")], [RED, BLUE], ["red"])
    assert report.flagged["red"] == [2] and report.negative_guided == []
    assert torch.equal(on_cond, off_cond) and torch.equal(on_img, off_img)


def test_refinement_source_with_irece_refused(pipe, pack):
    from erasekit.integrations.diffusers_calibrate import calibrate_irece

    irece = calibrate_irece(pipe, red_concept(), n_prompts=4, threshold=0.0, end=1.0,
                            call_kwargs={"num_inference_steps": 2, "height": 32, "width": 32})
    with pytest.raises(PackError, match="cannot be combined with IRECE"):
        guard(pipe, [_with(pack, negative_guidance=True, negative_source="refinement"), irece])


def test_refinement_source_can_be_set_at_calibration(pipe, pack):
    # the fix validate() gives ("pass --set negative_source=refinement") must work at calibration;
    # packs calibrated without it keep their hyperparameters as before (no new key)
    assert "negative_source" not in pack.hyperparameters
    delta = calibrate_cgce(pipe, red_concept(), negative_guidance=1, negative_source="refinement")
    assert delta.hyperparameters["negative_source"] == "refinement"
    with pytest.raises(PackError) as err:
        calibrate_cgce(pipe, red_concept(), negative_source="prompt").validate()  # as save_pretrained does
    assert err.value.field == "hyperparameters.negative_source"
