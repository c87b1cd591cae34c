"""The guard on other pipeline families, tiny and random, built offline: SDXL (UNet, two encoders,
penultimate layers), SD3 (a DiT with joint attention, CLIP x2 + T5) and CogVideoX (text-to-video).

For each: the hook attaches to the denoiser, fires on a flagged prompt (output changes), leaves
a benign prompt bit-identical, and detaching restores the unguarded output exactly. These are
plumbing tests; efficacy is measured on the trained world (benchmarks/diffusion_erasure).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from erasekit.errors import ErasekitError, PackError
from erasekit.guardrails.concept import Concept
from erasekit.integrations.diffusers import HOOK_NAME, guard
from erasekit.integrations.diffusers_calibrate import calibrate_cgce, calibrate_irece
from erasekit.testing import build_clip_tokenizer, build_tiny_sd_pipeline

WORDS = ("a an the red blue green star circle heart square cross on of with background white black grey "
         "photo painting").split()
SHAPES = ["circle", "square", "star", "heart", "cross"]
RED, BLUE = "a red star on a white background", "a blue heart on a grey background"


def _t5() -> tuple[T5EncoderModel, T5TokenizerFast]:
    """A tiny T5 encoder and a word-level Unigram tokenizer built in code (no hub)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg).eval(), tok


def _clip(cls: type, projection: bool = False) -> torch.nn.Module:
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=3, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407, projection_dim=32, hidden_act="gelu")
    return cls(cfg).eval()


def build_sdxl():
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=1, sample_size=32)
    tok = build_clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=_clip(CLIPTextModel), text_encoder_2=_clip(CLIPTextModelWithProjection),
        tokenizer=tok, tokenizer_2=tok, unet=unet.eval(), scheduler=EulerDiscreteScheduler(), force_zeros_for_empty_prompt=True)
    return pipe, {"height": 32, "width": 32}


def build_sd3(patch_size: int = 1, num_layers: int = 1):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=patch_size, in_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    t5, t5_tok = _t5()
    tok = build_clip_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(),
        text_encoder=_clip(CLIPTextModelWithProjection), tokenizer=tok,
        text_encoder_2=_clip(CLIPTextModelWithProjection), tokenizer_2=tok, text_encoder_3=t5, tokenizer_3=t5_tok)
    return pipe, {"height": 16, "width": 16, "max_sequence_length": 16}


def build_cogvideox(num_layers: int = 1, patch_size_t: int | None = None, rotary: bool = False, sample_size: int = 2):
    """Tiny CogVideoX 1.0 by default; ``patch_size_t`` + ``rotary`` (+ ``sample_size`` >= the latent
    grid, which 1.5's sliced RoPE needs) give the CogVideoX 1.5 layout."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
        DDIMScheduler,
    )

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16 if rotary else 8,  # 3D RoPE splits a head 1/4, 3/8, 3/8
        in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=num_layers,
        sample_width=sample_size, sample_height=sample_size, sample_frames=9, patch_size=2, patch_size_t=patch_size_t,
        use_rotary_positional_embeddings=rotary, temporal_compression_ratio=4, max_text_seq_length=16)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    t5, t5_tok = _t5()
    pipe = CogVideoXPipeline(tokenizer=t5_tok, text_encoder=t5, vae=vae.eval(), transformer=transformer.eval(),
                             scheduler=DDIMScheduler())
    return pipe, {"height": 16, "width": 16, "num_frames": 8, "max_sequence_length": 16}


BUILDERS = {"sdxl": build_sdxl, "sd3": build_sd3, "cogvideox": build_cogvideox}


def _output(result) -> torch.Tensor:
    return result.frames if hasattr(result, "frames") else result.images


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request):
    pipe, size = BUILDERS[request.param]()
    pipe.set_progress_bar_config(disable=True)
    forget = [f"a red {s} on a {b} background" for s in SHAPES for b in ("white", "black", "grey")]
    retain = [f"a {c} {s} on a {b} background" for c in ("blue", "green") for s in SHAPES for b in ("white", "black")]
    concept = Concept("red", forget=forget, retain=retain, keywords=["red"])
    encode = {k: v for k, v in size.items() if k == "max_sequence_length"}
    pack = calibrate_cgce(pipe, concept, encode_kwargs=encode)
    kwargs = {"num_inference_steps": 2, "output_type": "pt", **size}
    return request.param, pipe, pack, kwargs


def _run(fn, prompts, kwargs):
    return _output(fn(prompts, generator=torch.Generator().manual_seed(0), **kwargs))


def test_hook_fires_on_flagged_prompt_and_benign_stays_identical(family):
    name, pipe, pack, kwargs = family
    assert pack.hyperparameters["train_accuracy"] == 1.0
    baseline = _run(pipe, [RED, BLUE], kwargs)
    with guard(pipe, [pack]) as g:
        assert pipe.transformer._diffusers_hook.get_hook(HOOK_NAME) if name != "sdxl" else \
            pipe.unet._diffusers_hook.get_hook(HOOK_NAME)
        out = _run(lambda *a, **k: g(*a, erase=["red"], **k), [RED, BLUE], kwargs)
        flagged = g.last_report.flagged["red"]
        benign_only = _run(lambda *a, **k: g(*a, erase=["red"], **k), [BLUE, BLUE], kwargs)
    assert flagged == [2]  # CFG rows [uncond RED, uncond BLUE, RED, BLUE]: the conditional RED row
    assert not torch.equal(out[0], baseline[0])
    assert torch.equal(out[1], baseline[1])
    assert torch.equal(benign_only, _run(pipe, [BLUE, BLUE], kwargs))
    assert torch.equal(_run(pipe, [RED, BLUE], kwargs), baseline)  # detached: exactly unguarded again


def test_irece_on_unet_pipelines_and_refused_elsewhere(family):
    """IRECE runs on UNets (here), SD3 (tests/test_irece_sd3.py) and CogVideoX
    (tests/test_irece_video.py); a UNet IRECE pack is refused on both DiTs before anything attaches
    (Flux stays refused: tests/test_irece_video.py)."""
    name, pipe, pack, kwargs = family
    if name != "sdxl":
        foreign = calibrate_irece(build_tiny_sd_pipeline(0), pack.concept, n_prompts=2,
                                  call_kwargs={"num_inference_steps": 1, "height": 32, "width": 32})
        with pytest.raises(PackError) as err:
            guard(pipe, [pack, foreign])
        assert err.value.field == "hyperparameters.denoiser_family"
        assert pipe.transformer._diffusers_hook.get_hook(HOOK_NAME) is None
        return
    irece_pack = calibrate_irece(pipe, pack.concept, n_prompts=4, threshold=0.0, end=1.0,
                                 call_kwargs={k: v for k, v in kwargs.items() if k != "output_type"})
    baseline = _run(pipe, [RED, BLUE], kwargs)
    with guard(pipe, [irece_pack]) as g:
        out = _run(lambda *a, **k: g(*a, erase=[["red"], []], **k), [RED, BLUE], kwargs)
    assert not torch.equal(out[0], baseline[0]) and torch.equal(out[1], baseline[1])


def test_anchor_text_reencodes_flagged_prompts_on_every_family(family):
    """``anchor_text`` goes through each pipeline's own ``encode_prompt`` (SDXL: two encoders; SD3: three,
    with the call's ``max_sequence_length``; CogVideoX: T5): the flagged image changes, the benign one does not."""
    import dataclasses

    name, pipe, pack, kwargs = family
    anchored = dataclasses.replace(pack, hyperparameters={**pack.hyperparameters, "anchor_text": "green"}, source=None)
    anchored.validate()
    baseline = _run(pipe, [RED, BLUE], kwargs)
    with guard(pipe, [pack]) as g:
        plain = _run(lambda *a, **k: g(*a, erase=["red"], **k), [RED, BLUE], kwargs)
    with guard(pipe, [anchored]) as g:
        out = _run(lambda *a, **k: g(*a, erase=["red"], **k), [RED, BLUE], kwargs)
        report = g.last_report
    assert report.anchored == {"red": [2]} and not report.anchor_text_skipped
    assert not torch.equal(out[0], plain[0])
    assert torch.equal(out[1], baseline[1])



def test_detection_head_calibrates_and_guards_on_every_family(family):
    """A CGCE pack with a detection head (``detect_phrases``) on SDXL (two encoders), SD3 (three, the call's
    ``max_sequence_length``) and CogVideoX (T5): the head reads the same conditioning shape, flags the red
    prompt only, and the benign image stays unguarded."""
    name, pipe, pack, kwargs = family
    encode = {k: v for k, v in kwargs.items() if k == "max_sequence_length"}
    headed = calibrate_cgce(pipe, pack.concept, encode_kwargs=encode, detect_phrases=["red", "crimson"])
    assert headed.hyperparameters["detect_train_accuracy"] == 1.0
    assert headed.classifier_onnx != pack.classifier_onnx
    baseline = _run(pipe, [RED, BLUE], kwargs)
    with guard(pipe, [headed]) as g:
        out = _run(lambda *a, **k: g(*a, erase=["red"], **k), [RED, BLUE], kwargs)
        assert g.last_report.flagged["red"] == [2]
    assert not torch.equal(out[0], baseline[0]) and torch.equal(out[1], baseline[1])


def test_per_prompt_toggles_with_several_videos_per_prompt_refused(family):
    """Wan repeats each prompt num_videos_per_prompt times, CogVideoX forces one: per-prompt lists would be
    mapped onto rows by a guess, so they are refused; one list for all prompts is unambiguous."""
    name, pipe, pack, kwargs = family
    if name != "cogvideox":
        pytest.skip("num_videos_per_prompt is a video pipeline's")
    with guard(pipe, [pack]) as g:
        with pytest.raises(ErasekitError, match="num_videos_per_prompt"):
            g([RED, BLUE], erase=[["red"], []], num_videos_per_prompt=2, **kwargs)
        g([RED, BLUE], generator=torch.Generator().manual_seed(0), erase=["red"], num_videos_per_prompt=2, **kwargs)
        assert g.last_report.flagged["red"] == [2]
