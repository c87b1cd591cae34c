"""IRECE on CogVideoX (text-to-video, joint attention), tiny and random, built offline.

Calibration, the probe read identically at calibration and guard time, hooks, gate, text cut,
the mask on the (frame, h/p, w/p) video-token grid, the CogVideoX 1.5 layout (temporal patch +
rotary embedding), refusals. Model: ``build_cogvideox`` from tests/test_diffusers_pipelines.py
(2 blocks, patch 2, T5 with a tokenizer built in code) at 64x64 px and 9 frames: latents
``[B, 3, 4, 8, 8]``, 3 x 4 x 4 = 48 video tokens.

The model is random, so it draws nothing meaningful and nothing here measures erasure. The probes
are really fitted (forget prompts all say "red", retain prompts never do; in joint attention the
video tokens attend to the text tokens, so even a random transformer's video queries carry the
prompt: training accuracy 1.0). Whether the *calibrated* thresholds (maximum over 8 held-out
retain generations) latch the test's red video is up to the random weights, so the tests that
need the gate to fire SET THE THRESHOLDS EXPLICITLY (``_gated``): at the first decision step,
midway between the red video's probe logit and the highest benign one, after asserting the probe
ranks the red video above every benign video; out of reach (+1e4) elsewhere. The calibrated pack
itself is used where nothing may fire (benign-only batch, wrong family).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from erasekit.errors import ErasekitError, PackError
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.diffusers import (
    HOOK_NAME,
    _CaptureProcessor,
    _VideoCaptureProcessor,
    denoiser_family,
    guard,
    irece_attention_processors,
)
from erasekit.integrations.diffusers_calibrate import calibrate_irece, record_queries
from erasekit.testing import build_clip_tokenizer, build_tiny_sd_pipeline
from tests._irece import OTHER_BLUE, hand_set_gate, red_concept, with_hp
from tests.test_diffusers_pipelines import BLUE, RED, _clip, _t5, build_cogvideox

STEPS = 4
LAYERS = ["transformer_blocks.0.attn1.processor", "transformer_blocks.1.attn1.processor"]


def _build(**options):
    pipe, size = build_cogvideox(num_layers=2, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe, {**size, "height": 64, "width": 64, "num_frames": 9, "num_inference_steps": STEPS}


@pytest.fixture(scope="module")
def concept():
    return red_concept()


@pytest.fixture(scope="module")
def cog():
    return _build()


@pytest.fixture(scope="module")
def pack(cog, concept):
    pipe, kwargs = cog
    # re-noise the whole schedule (end=1.0) so a latched video changes whatever step it latches at
    return calibrate_irece(pipe, concept, n_prompts=8, n_holdout=8, call_kwargs=kwargs, end=1.0)


@pytest.fixture(scope="module")
def gated(cog, pack):
    return _gated(*cog, pack)


def _gated(pipe, kwargs, pack: ConceptPack) -> ConceptPack:
    """``pack`` with gate thresholds set by the test (see the module docstring)."""
    return hand_set_gate(pipe, pack, lambda g, prompts: _run(g, prompts, kwargs, erase=["red"]), STEPS)


def _run(fn, prompts, kwargs, output_type="pt", **extra):
    return fn(prompts, generator=torch.Generator().manual_seed(0), output_type=output_type, **kwargs, **extra).frames


def _spy_masks(g, changed: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """Record every mask the guard builds for "red", with the per-layer token maps it was built
    from; ``changed`` collects (latent voxels the step's re-noising changed, mask) pairs."""
    seen: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    original = g._irece_step

    def spy(state, step, latents):
        maps = [m[-latents.shape[0]:].clone() for m in state.maps.get("red", [])]  # conditional rows
        before = latents.clone()
        out = original(state, step, latents)
        if "red" in state.masks and maps:
            seen.append((state.masks["red"].clone(), maps))
        if changed is not None and "red" in state.masks:
            changed.append((out != before, state.masks["red"].clone()))
        return out

    g._irece_step = spy
    return seen


def _expected_mask(maps: list[torch.Tensor], frames: int, patch_t: int) -> torch.Tensor:
    """The undilated mask of video 0 computed independently: tokens ordered (frame, row, column),
    each token -> patch_t latent frames x 2 x 2 latent pixels, above the video's mean."""
    grid = sum(maps)[0].view(frames // patch_t, 4, 4)
    up = grid.repeat_interleave(patch_t, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
    return up > up.mean()


def _assert_probe_consistent(pipe, kwargs, pack):
    """The guard's gate logits equal the calibration recorder's, computed independently.

    ``record_queries`` (what calibration fits on) gives the mean video-token query per layer and
    step; the probe on it is the video logit. The guard folds the same probe in front of ``to_q``
    and averages per-token logits. Both must agree at every decision step -- they would not if
    either read the query after ``norm_q`` / the rotary embedding, or lost the rotary embedding
    on the way to the inner processor (the denoising trajectory would differ).
    """
    unreachable = dataclasses.replace(pack, tensors={**pack.tensors,
                                                     "gate_threshold": pack.tensors["gate_threshold"] + 1e4}, source=None)
    with guard(pipe, [unreachable]) as g:
        _run(g, [RED, BLUE], kwargs, output_type="latent", erase=["red"])
        margins = np.asarray(g.last_report.irece_gate["red"])  # [decision steps, videos]
    rec = record_queries(pipe, [RED, BLUE], LAYERS, 1.0, seed=0, **kwargs)
    feats = torch.cat([rec[n].view(2, STEPS, -1) for n in LAYERS], -1).numpy()  # [videos, steps, L*C]
    weight = torch.cat([pack.tensors[f"probe_weight.{i}"] for i in range(len(LAYERS))], -1).numpy()
    logits = np.einsum("nsf,sf->ns", feats, weight) + pack.tensors["probe_bias"].numpy()
    thresholds = unreachable.tensors["gate_threshold"].numpy()
    assert margins.shape == (2, 2)  # decide window [0.2, 0.5) of 4 steps: steps 0 and 1
    for step in range(margins.shape[0]):
        np.testing.assert_allclose(margins[step] + thresholds[step], logits[:, step], rtol=1e-4, atol=1e-3)


def test_pack_records_the_family_and_the_video_attention_layers(cog, pack, tmp_path):
    pipe, _ = cog
    assert denoiser_family(pipe) == "cogvideox"
    assert irece_attention_processors(pipe) == LAYERS
    hp = pack.hyperparameters
    assert hp["denoiser_family"] == "cogvideox" and hp["layers"] == LAYERS
    assert hp["probe_train_accuracy"] == 1.0 and hp["gate_holdout_negatives"] == 8
    attn = pipe.transformer.transformer_blocks[0].attn1
    assert pack.tensors["probe_weight.0"].shape == (STEPS, attn.to_q.out_features)
    loaded = ConceptPack.from_pretrained(pack.save_pretrained(tmp_path / "red-irece-cogvideox"))
    assert loaded.hyperparameters["denoiser_family"] == "cogvideox"
    assert {n: torch.equal(t, pack.tensors[n]) for n, t in loaded.tensors.items()} == dict.fromkeys(pack.tensors, True)


def test_probe_reads_the_same_queries_at_calibration_and_guard_time(cog, pack):
    _assert_probe_consistent(*cog, pack)


def test_gate_fires_on_the_flagged_video_benign_stay_identical_detach_restores(cog, pack, gated):
    pipe, kwargs = cog
    originals = dict(pipe.transformer.attn_processors)
    assert not any(isinstance(p, _CaptureProcessor) for p in originals.values())  # earlier guards detached
    baseline = _run(pipe, [RED, BLUE], kwargs)
    benign_baseline = _run(pipe, [BLUE, OTHER_BLUE], kwargs)
    with guard(pipe, [gated]) as g:
        assert pipe.transformer._diffusers_hook.get_hook(HOOK_NAME) is not None
        procs = pipe.transformer.attn_processors
        assert all(isinstance(procs[n], _VideoCaptureProcessor) and procs[n].inner is originals[n] for n in LAYERS)
        out = _run(g, [RED, BLUE], kwargs, erase=["red"])  # the concept is toggled for BOTH prompts
        report = g.last_report
        benign = _run(g, [BLUE, OTHER_BLUE], kwargs, erase=["red"])
        benign_report = g.last_report
    with guard(pipe, [pack]) as g:  # the calibrated gate: benign-only batch untouched too
        calibrated = _run(g, [BLUE, OTHER_BLUE], kwargs, erase=["red"])
        assert g.last_report.irece_latched.get("red", []) == []
    assert report.irece_latched["red"] == [0]  # the gate told them apart: only the red video latched
    assert all(0 < f < 1 for f in report.irece_masked_fraction["red"])  # a mask, not the whole video
    assert out.shape == baseline.shape == (2, 9, 3, 64, 64)
    assert not torch.equal(out[0], baseline[0])
    assert torch.equal(out[1], baseline[1])  # benign prompt of the same batch: bit-identical
    assert benign_report.irece_latched.get("red", []) == [] and benign_report.irece_gate["red"]
    assert torch.equal(benign, benign_baseline) and torch.equal(calibrated, benign_baseline)  # benign-only batch
    assert pipe.transformer.attn_processors == originals  # the very same processor objects
    assert all(pipe.transformer.attn_processors[n] is originals[n] for n in originals)
    assert pipe.transformer._diffusers_hook.get_hook(HOOK_NAME) is None
    assert torch.equal(_run(pipe, [RED, BLUE], kwargs), baseline)  # detached: exactly unguarded again


def test_text_cut_alone_and_renoising_alone_each_change_the_latched_video(cog, gated):
    """Re-noising off (strength 0): only the joint-attention cut (cond -> uncond video-token
    output under the mask) can change the output; with the cut off too, nothing may change; with
    the cut off and re-noising on, re-noising alone changes it."""
    pipe, kwargs = cog
    baseline = _run(pipe, [RED, BLUE], kwargs)
    with guard(pipe, [with_hp(gated, strength=0.0)]) as g:
        cut = _run(g, [RED, BLUE], kwargs, erase=["red"])
        assert g.last_report.irece_latched["red"] == [0]
        assert g.last_report.irece_masked_fraction.get("red", []) == []  # no re-noising happened
    with guard(pipe, [with_hp(gated, strength=0.0, cut="none")]) as g:
        neither = _run(g, [RED, BLUE], kwargs, erase=["red"])
        assert g.last_report.irece_latched["red"] == [0]  # latched, but nothing acts
    with guard(pipe, [with_hp(gated, cut="none")]) as g:
        renoised = _run(g, [RED, BLUE], kwargs, erase=["red"])
        assert g.last_report.irece_latched["red"] == [0] and g.last_report.irece_masked_fraction["red"]
    assert not torch.equal(cut[0], baseline[0]) and torch.equal(cut[1], baseline[1])
    assert torch.equal(neither, baseline)
    assert not torch.equal(renoised[0], baseline[0]) and torch.equal(renoised[1], baseline[1])


def test_mask_lies_on_the_video_token_grid(cog, gated):
    """patch_size 2: every video token covers 2x2 latent pixels of one latent frame, so an
    undilated mask is a union of whole patches in each frame, and it may differ between frames."""
    pipe, kwargs = cog
    changed: list[tuple[torch.Tensor, torch.Tensor]] = []
    with guard(pipe, [with_hp(gated, dilate=0)]) as g:
        seen = _spy_masks(g, changed)
        _run(g, [RED, BLUE], kwargs, output_type="latent", erase=["red"])
    assert changed  # re-noising ([B, F, C, H, W] latents) changes exactly the masked voxels, all channels
    assert all(torch.equal(diff, mask.expand_as(diff)) for diff, mask in changed)
    assert seen
    for mask, maps in seen:
        assert mask.shape == (2, 3, 1, 8, 8) and not mask[1].any()  # [videos, frames, 1, H, W]
        m = mask[0, :, 0].float()  # latched video 0
        assert 0 < m.mean() < 1
        patches = m.view(3, 4, 2, 4, 2)
        assert torch.equal(patches.amax(dim=(2, 4)), patches.amin(dim=(2, 4)))  # constant on each 2x2 patch
        assert torch.equal(mask[0, :, 0], _expected_mask(maps, 3, 1))  # the right token on the right voxels
    assert any(not torch.equal(mask[0, 0], mask[0, f]) for mask, _ in seen for f in (1, 2))  # frames differ
    with guard(pipe, [with_hp(gated, mask="image")]) as g:  # mask mode "image": the whole latched video
        whole = _spy_masks(g)
        _run(g, [RED, BLUE], kwargs, output_type="latent", erase=["red"])
    assert whole and all(mask[0].all() and not mask[1].any() for mask, _ in whole)


def test_cogvideox_1_5_layout_temporal_patch_and_rotary(concept):
    """CogVideoX 1.5 layout: ``patch_size_t`` 2 (each token covers 2 latent frames; the pipeline
    pads 3 latent frames to 4) and a 3D rotary embedding on q and k inside the processor. The
    probe still reads ``to_q`` before the rotary embedding, identically at calibration and guard
    time; the wrappers forward the rotary embedding (benign output bit-identical); the mask is
    constant on 2-frame x 2 x 2 token blocks. Gate set by hand (module docstring)."""
    pipe, kwargs = _build(patch_size_t=2, rotary=True, sample_size=8)
    pack = calibrate_irece(pipe, concept, n_prompts=8, n_holdout=8, call_kwargs=kwargs, end=1.0)
    assert pack.hyperparameters["denoiser_family"] == "cogvideox"
    _assert_probe_consistent(pipe, kwargs, pack)
    gated = _gated(pipe, kwargs, pack)
    baseline = _run(pipe, [RED, BLUE], kwargs)
    with guard(pipe, [with_hp(gated, dilate=0)]) as g:
        seen = _spy_masks(g)
        out = _run(g, [RED, BLUE], kwargs, erase=["red"])
        assert g.last_report.irece_latched["red"] == [0]
    assert not torch.equal(out[0], baseline[0]) and torch.equal(out[1], baseline[1])
    assert seen
    for mask, maps in seen:
        assert mask.shape == (2, 4, 1, 8, 8) and not mask[1].any()
        m = mask[0, :, 0].float()
        assert 0 < m.mean() < 1
        blocks = m.view(2, 2, 4, 2, 4, 2)
        assert torch.equal(blocks.amax(dim=(1, 3, 5)), blocks.amin(dim=(1, 3, 5)))
        assert torch.equal(mask[0, :, 0], _expected_mask(maps, 4, 2))


def _tiny_flux():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1)
    t5, t5_tok = _t5()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=_clip(CLIPTextModel),
                        tokenizer=build_clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tok,
                        transformer=transformer.eval())


def test_wrong_family_packs_refused_before_anything_attaches(cog, pack, concept):
    pipe, _ = cog
    unet_pipe = build_tiny_sd_pipeline(0)
    unet_pack = calibrate_irece(unet_pipe, concept, n_prompts=2, n_holdout=2,
                                call_kwargs={"num_inference_steps": 1, "height": 32, "width": 32})
    legacy = dataclasses.replace(unet_pack, hyperparameters={
        k: v for k, v in unet_pack.hyperparameters.items() if k != "denoiser_family"}, source=None)
    sd3_pack = with_hp(pack, denoiser_family="sd3")  # what an SD3 pack would declare
    for target, wrong, names in ((pipe, unet_pack, ("'unet'", "'cogvideox'")), (pipe, legacy, ("'unet'", "'cogvideox'")),
                                 (pipe, sd3_pack, ("'sd3'", "'cogvideox'")), (unet_pipe, pack, ("'cogvideox'", "'unet'"))):
        denoiser = target.transformer if target is pipe else target.unet
        before = dict(denoiser.attn_processors)
        with pytest.raises(PackError, match="calibrate the IRECE pack on this pipeline") as err:
            guard(target, [wrong])
        assert err.value.field == "hyperparameters.denoiser_family"
        assert all(n in str(err.value) for n in names)
        hooks = getattr(denoiser, "_diffusers_hook", None)
        assert hooks is None or hooks.get_hook(HOOK_NAME) is None
        assert all(p is before[n] for n, p in denoiser.attn_processors.items())


def test_flux_still_refused_with_a_clear_error(pack, concept):
    """Flux's joint attention is not built: calibration and a (CogVideoX) IRECE pack are refused,
    the pack before anything attaches, and the error says to use CGCE there."""
    flux = _tiny_flux()
    assert denoiser_family(flux) == "FluxTransformer2DModel" and irece_attention_processors(flux) == []
    with pytest.raises(ErasekitError, match="use CGCE alone on Flux/Wan"):
        calibrate_irece(flux, concept, n_prompts=2)
    before = dict(flux.transformer.attn_processors)
    with pytest.raises(PackError, match="Flux/Wan") as err:
        guard(flux, [pack])
    assert err.value.field == "method"
    hooks = getattr(flux.transformer, "_diffusers_hook", None)
    assert hooks is None or hooks.get_hook(HOOK_NAME) is None
    assert all(p is before[n] for n, p in flux.transformer.attn_processors.items())
