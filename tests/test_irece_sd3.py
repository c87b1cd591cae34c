"""IRECE on SD3 (joint attention), tiny and random, built offline: calibration, hooks, gate, cut, mask, refusals.

The model is random, so it draws nothing meaningful and nothing here measures erasure. The
probes are really fitted (forget prompts all say "red", retain prompts never do; in joint
attention the image tokens attend to the text tokens, so even a random transformer's image
queries carry the prompt: training accuracy 1.0), but the *calibrated* gate thresholds -- the
maximum over 8 held-out retain generations -- sit above the test's red image on this random
model. So the tests that need the gate to fire SET THE THRESHOLDS EXPLICITLY (fixture ``gated``):
at the first decision step, midway between the red image's probe logit and the highest benign
one, after asserting the probe ranks the red image above every benign image; out of reach (+1e4)
elsewhere. The calibrated pack itself is used where nothing may fire (benign-only batch, wrong family).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from erasekit.errors import PackError
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.diffusers import (
    HOOK_NAME,
    _CaptureProcessor,
    _JointCaptureProcessor,
    denoiser_family,
    guard,
    irece_attention_processors,
)
from erasekit.integrations.diffusers_calibrate import calibrate_irece
from erasekit.testing import build_tiny_sd_pipeline
from tests._irece import OTHER_BLUE, hand_set_gate, red_concept, with_hp
from tests.test_diffusers_pipelines import BLUE, RED, build_sd3

STEPS = 4


@pytest.fixture(scope="module")
def sd3():
    pipe, size = build_sd3(patch_size=2, num_layers=2)  # 16x16 latent -> 8x8 image tokens
    pipe.set_progress_bar_config(disable=True)
    return pipe, {"num_inference_steps": STEPS, **size}


@pytest.fixture(scope="module")
def concept():
    return red_concept()


@pytest.fixture(scope="module")
def pack(sd3, concept):
    pipe, kwargs = sd3
    # re-noise the whole schedule (end=1.0) so a latched image changes whatever step it latches at
    return calibrate_irece(pipe, concept, n_prompts=8, n_holdout=8, call_kwargs=kwargs, end=1.0)


@pytest.fixture(scope="module")
def gated(sd3, pack):
    """``pack`` with gate thresholds set by the test (see the module docstring)."""
    pipe, kwargs = sd3
    return hand_set_gate(pipe, pack, lambda g, prompts: _run(g, prompts, kwargs, erase=["red"]), STEPS)


def _run(fn, prompts, kwargs, **extra):
    return fn(prompts, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs, **extra).images


def test_pack_records_the_family_and_the_joint_attention_layers(sd3, pack, tmp_path):
    pipe, _ = sd3
    assert denoiser_family(pipe) == "sd3"
    layers = ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]
    assert irece_attention_processors(pipe) == layers
    hp = pack.hyperparameters
    assert hp["denoiser_family"] == "sd3" and hp["layers"] == layers
    assert hp["probe_train_accuracy"] == 1.0 and hp["gate_holdout_negatives"] == 8
    assert pack.tensors["probe_weight.0"].shape == (STEPS, pipe.transformer.transformer_blocks[0].attn.to_q.out_features)
    loaded = ConceptPack.from_pretrained(pack.save_pretrained(tmp_path / "red-irece-sd3"))
    assert loaded.hyperparameters["denoiser_family"] == "sd3"
    assert {n: torch.equal(t, pack.tensors[n]) for n, t in loaded.tensors.items()} == dict.fromkeys(pack.tensors, True)


def test_gate_fires_on_the_flagged_image_benign_stay_identical_detach_restores(sd3, pack, gated):
    pipe, kwargs = sd3
    originals = dict(pipe.transformer.attn_processors)
    assert not any(isinstance(p, _CaptureProcessor) for p in originals.values())  # earlier guards detached
    baseline = _run(pipe, [RED, BLUE], kwargs)
    benign_baseline = _run(pipe, [BLUE, OTHER_BLUE], kwargs)
    with guard(pipe, [gated]) as g:
        assert pipe.transformer._diffusers_hook.get_hook(HOOK_NAME) is not None
        procs = pipe.transformer.attn_processors
        assert all(isinstance(procs[n], _JointCaptureProcessor) and procs[n].inner is originals[n]
                   for n in pack.hyperparameters["layers"])
        out = _run(g, [RED, BLUE], kwargs, erase=["red"])  # the concept is toggled for BOTH prompts
        report = g.last_report
        benign = _run(g, [BLUE, OTHER_BLUE], kwargs, erase=["red"])
        benign_report = g.last_report
    with guard(pipe, [pack]) as g:  # the calibrated gate: benign-only batch untouched too
        calibrated = _run(g, [BLUE, OTHER_BLUE], kwargs, erase=["red"])
        assert g.last_report.irece_latched.get("red", []) == []
    assert report.irece_latched["red"] == [0]  # the gate told them apart: only the red image latched
    assert report.irece_gate["red"]  # evaluated over the decision window
    assert all(0 < f < 1 for f in report.irece_masked_fraction["red"])  # a mask, not the whole image
    assert not torch.equal(out[0], baseline[0])
    assert torch.equal(out[1], baseline[1])  # benign prompt of the same batch: bit-identical
    assert benign_report.irece_latched.get("red", []) == [] and benign_report.irece_gate["red"]
    assert torch.equal(benign, benign_baseline) and torch.equal(calibrated, benign_baseline)  # benign-only batch
    assert pipe.transformer.attn_processors == originals  # the very same processor objects
    assert pipe.transformer._diffusers_hook.get_hook(HOOK_NAME) is None
    assert torch.equal(_run(pipe, [RED, BLUE], kwargs), baseline)  # detached: exactly unguarded again


def test_text_cut_alone_changes_the_latched_image_through_joint_attention(sd3, gated):
    """Re-noising off (strength 0): only the joint-attention cut (cond -> uncond image-token output
    under the mask) can change the output; with the cut off too, nothing may change."""
    pipe, kwargs = sd3
    baseline = _run(pipe, [RED, BLUE], kwargs)
    with guard(pipe, [with_hp(gated, strength=0.0)]) as g:
        cut = _run(g, [RED, BLUE], kwargs, erase=["red"])
        assert g.last_report.irece_latched["red"] == [0]
    with guard(pipe, [with_hp(gated, strength=0.0, cut="none")]) as g:
        neither = _run(g, [RED, BLUE], kwargs, erase=["red"])
        assert g.last_report.irece_latched["red"] == [0]  # latched, but nothing acts
    assert not torch.equal(cut[0], baseline[0]) and torch.equal(cut[1], baseline[1])
    assert torch.equal(neither, baseline)


def test_mask_lies_on_the_image_token_grid(sd3, gated):
    """patch_size 2: every image token covers 2x2 latent pixels, so an undilated mask is a union
    of whole patches (mapped back by nearest, not smeared across patch borders)."""
    pipe, kwargs = sd3
    seen: list[torch.Tensor] = []
    with guard(pipe, [with_hp(gated, dilate=0)]) as g:
        original = g._irece_step

        def spy(state, step, latents):
            out = original(state, step, latents)
            if "red" in state.masks:
                seen.append(state.masks["red"].clone())
            return out

        g._irece_step = spy
        _run(g, [RED, BLUE], kwargs, erase=["red"])
    assert seen
    for mask in seen:
        m = mask[0, 0].float()  # latched image 0, latent grid 16x16
        assert m.shape == (16, 16) and 0 < m.mean() < 1 and not mask[1].any()
        patches = m.view(8, 2, 8, 2)
        assert torch.equal(patches.amax(dim=(1, 3)), patches.amin(dim=(1, 3)))  # constant on each 2x2 patch


def test_skip_layer_guidance_pass_is_not_scored(sd3, gated):
    """SD3's skip-layer guidance runs a third, conditional-only transformer pass per step (here at
    steps 1-3). Only the [uncond, cond] pass is scored: the gate sees exactly what it sees without
    skip-layer guidance (step 0 is identical in both runs, so step 1's margins must be too)."""
    pipe, kwargs = sd3
    slg = {"skip_guidance_layers": [0], "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0}
    baseline = _run(pipe, [RED, BLUE], kwargs, **slg)
    with guard(pipe, [gated]) as g:
        plain_gate = (_run(g, [RED, BLUE], kwargs, erase=["red"]), g.last_report.irece_gate["red"])[1]
        out = _run(g, [RED, BLUE], kwargs, erase=["red"], **slg)
        report = g.last_report
    assert report.irece_latched["red"] == [0]
    assert report.irece_gate["red"] == plain_gate
    assert not torch.equal(out[0], baseline[0]) and torch.equal(out[1], baseline[1])


def test_wrong_family_packs_refused_before_anything_attaches(sd3, pack, concept):
    pipe, _ = sd3
    unet_pipe = build_tiny_sd_pipeline(0)
    unet_pack = calibrate_irece(unet_pipe, concept, n_prompts=2, n_holdout=2,
                                call_kwargs={"num_inference_steps": 1, "height": 32, "width": 32})
    assert unet_pack.hyperparameters["denoiser_family"] == "unet"
    legacy = dataclasses.replace(unet_pack, hyperparameters={
        k: v for k, v in unet_pack.hyperparameters.items() if k != "denoiser_family"}, source=None)
    for target, wrong in ((pipe, unet_pack), (pipe, legacy), (unet_pipe, pack)):
        denoiser = target.transformer if target is pipe else target.unet
        before = dict(denoiser.attn_processors)
        with pytest.raises(PackError, match="calibrate the IRECE pack on this pipeline") as err:
            guard(target, [wrong])
        assert err.value.field == "hyperparameters.denoiser_family"
        assert ("'unet'" in str(err.value)) and ("'sd3'" in str(err.value))
        hooks = getattr(denoiser, "_diffusers_hook", None)
        assert hooks is None or hooks.get_hook(HOOK_NAME) is None
        assert all(p is before[n] for n, p in denoiser.attn_processors.items())
