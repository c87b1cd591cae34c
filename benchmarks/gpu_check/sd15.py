"""Section D: the CGCE guard on a Stable Diffusion 1.5-sized pipeline at random weights.

Components with SD1.5's real sizes -- ``UNet2DConditionModel`` (SD1.5 config, ~860 M params),
``AutoencoderKL`` (SD config), ``CLIPTextModel`` (ViT-L/14 text tower config, ~123 M) and the real
CLIP tokenizer (from erasekit's cached vocabulary: ``--clip-tokenizer DIR``, since the GPU
machine has no open_clip to rebuild it) -- built directly on the device and cast to fp16, so the
random init takes seconds. Weights are random: this measures the guard's plumbing and latency at
real sizes (conditioning ``[77, 768]``, 512x512, 20 steps), not efficacy.

A CGCE pack for one concept (the diffusion world's ``red``) is calibrated on the device from the
world's prompt templates (64 + 64 prompts; fixed ``C`` to keep the section inside its time budget).
Checks: benign prompts bit-identical to the unguarded pipeline, flagged prompts changed, images
finite. Latency (batch 1 and 4, guidance 7.5): unguarded vs guarded benign vs guarded flagged,
interleaved and synchronised; the refine step count; and the refine loop alone on the device,
before/after (``benchmarks.gpu_check.refine_bench``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.gpu_check.common import Section, log, paired_timing, sync

CONCEPT = "red"
#: ``anchor_text`` of the anchored variant (random weights: words only exercise the re-encode and its cost)
ANCHOR_TEXT = "with a plain fill"
#: the carried copy of erasekit's tokenizer cache (``.whl`` travels to the GPU machine)
DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parents[2] / ".whl" / "clip-tokenizer-sd1"

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}
CLIP_L_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
#: --quick: same layout, shrunk (a full SD1.5 UNet on one CPU thread is far too slow)
QUICK_UNET = {**SD15_UNET, "sample_size": 8, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1,
              "cross_attention_dim": 64}
QUICK_VAE = {**SD_VAE, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1, "sample_size": 64}
QUICK_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


def tokenizer_dir(arg: str | None) -> Path | None:
    """``--clip-tokenizer``, else the carried ``.whl/clip-tokenizer-sd1``, else None (erasekit's cache)."""
    if arg:
        return Path(arg)
    return DEFAULT_TOKENIZER_DIR if (DEFAULT_TOKENIZER_DIR / "vocab.json").exists() else None


def build_pipeline(device: torch.device, dtype: torch.dtype, quick: bool, tok_dir: Path | None, seed: int = 0) -> Any:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.testing.tiny_sd import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE, build_clip_tokenizer

    tokenizer = build_clip_tokenizer(tok_dir)
    text_cfg = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_EOS_ID,
        **(QUICK_TEXT if quick else CLIP_L_TEXT),
    )
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):  # init on the device: seconds
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_cfg)
        unet = UNet2DConditionModel(**(QUICK_UNET if quick else SD15_UNET))
        vae = AutoencoderKL(**(QUICK_VAE if quick else SD_VAE))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae.to(dtype).eval(), text_encoder=text_encoder.to(dtype).eval(), tokenizer=tokenizer,
        unet=unet.to(dtype).eval(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _prompts() -> Any:
    """The diffusion world's prompt generators (they read no weights)."""
    from erasekit.testing.diffusion_world import World

    return World(pipe=None, detector=None, weights_dir=Path("."))


def run(sec: Section, device: torch.device, quick: bool, tokenizer: str | None, budget_s: float = 90.0,
        reps: int = 5, batches: tuple[int, ...] = (1, 4), warmup_s: float = 10.0,
        anchor_text_dtype: str | None = None) -> None:
    import diffusers

    from erasekit import Concept
    from erasekit.integrations.diffusers import guard
    from erasekit.integrations.diffusers_calibrate import calibrate_cgce

    t_start = time.perf_counter()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tok_dir = tokenizer_dir(tokenizer)
    sec.report("diffusers", diffusers.__version__)
    sec.report("clip tokenizer dir", str(tok_dir) if tok_dir else "erasekit cache (built from open_clip's BPE)")
    t0 = time.perf_counter()
    pipe = build_pipeline(device, dtype, quick, tok_dir)
    sync(device)
    sec.report("build s (random init on the device)", round(time.perf_counter() - t0, 2))
    sec.report("params M (unet, vae, text_encoder)", [
        round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for m in (pipe.unet, pipe.vae, pipe.text_encoder)
    ])
    sec.report("dtype", str(dtype))

    world = _prompts()
    n_prompts, size, steps, batches, reps = (16, 64, 4, (1, 2), 2) if quick else (64, 512, 20, batches, reps)
    t0 = time.perf_counter()
    concept = Concept(CONCEPT, forget=world.train_prompts(CONCEPT, n_prompts, seed=1),
                      retain=world.retain_prompts(CONCEPT, n_prompts, seed=1), keywords=[CONCEPT])
    pack = calibrate_cgce(pipe, concept, C=0.01)
    try:
        from benchmarks.diffusion_erasure import tuned_cgce_hyperparameters, with_hyperparameters

        hp = tuned_cgce_hyperparameters()
        if hp:
            pack = with_hyperparameters(pack, **hp)
    except Exception as exc:  # noqa: BLE001 - the benchmark package is optional here
        hp = f"unavailable ({type(exc).__name__}: {exc}); pack defaults"
    sec.report("cgce hyperparameter overrides", hp)
    sec.report(f"cgce calibration s ({n_prompts}+{n_prompts} prompts, C=0.01)", round(time.perf_counter() - t0, 2))
    sec.report("cgce train accuracy", pack.hyperparameters.get("train_accuracy"))
    sec.report("conditioning shape", [pack.hyperparameters.get("seq_len"), pack.hyperparameters.get("embed_dim")])

    anchored_pack = dataclasses.replace(pack, hyperparameters={**pack.hyperparameters, "anchor_text": ANCHOR_TEXT},
                                        source=None)
    anchored_pack.validate()
    ga = guard(pipe, [anchored_pack], anchor_text_dtype=anchor_text_dtype)
    ga.detach()
    sec.report("anchor_text_dtype (the anchored guard's re-encoding)", anchor_text_dtype or "the pipeline's own")
    g = guard(pipe, [pack])
    kw = {"num_inference_steps": steps, "height": size, "width": size, "guidance_scale": 7.5, "output_type": "np"}
    gen_device = device if device.type == "cuda" else torch.device("cpu")

    def call(fn: Any, prompts: list[str], **extra: Any) -> np.ndarray:
        gens = [torch.Generator(gen_device).manual_seed(i) for i in range(len(prompts))]
        # no_grad (the pipeline's own mode): under inference_mode the guard's conditioning cache
        # fails (inference tensors have no version counter)
        with torch.no_grad():
            return np.asarray(fn(prompts, generator=gens, **kw, **extra).images)

    if device.type == "cuda" and warmup_s > 0:  # a lent GPU idles far below its working clock
        warm_clock(pipe, device, warmup_s)
        sec.report("clock warm-up s (UNet forwards before timing)", warmup_s)
    try:
        for bi, b in enumerate(batches):
            benign = [s.prompt for s in world.benign_specs(CONCEPT, b, 21)]
            direct = world.direct_prompts(CONCEPT, b, 21)
            last: dict[str, Any] = {}

            def plain(prompts: list[str] = benign, last: dict = last) -> None:
                g.detach()
                try:
                    last["unguarded"] = call(pipe, prompts)
                finally:
                    g.attach()

            def guarded(name: str, prompts: list[str], last: dict = last) -> Any:
                def fn() -> None:
                    last[name] = call(g, prompts, erase=[CONCEPT])
                    last[name + "_report"] = g.last_report

                return fn

            def anchored(prompts: list[str] = direct, last: dict = last, erase: object = None) -> None:
                g.detach()
                ga.attach()
                try:
                    last["anchored_flagged"] = call(ga, prompts, erase=erase or [CONCEPT])
                    last["anchored_flagged_report"] = ga.last_report
                finally:
                    ga.detach()
                    g.attach()

            variants = {"unguarded": plain, "guarded_benign": guarded("guarded_benign", benign),
                        "guarded_flagged": guarded("guarded_flagged", direct), "anchored_flagged": anchored}
            # one untimed round: outputs for the checks, and the cost of a round for the budget
            t0 = time.perf_counter()
            plain(direct)
            unguarded_flagged = last["unguarded"]
            for run_one in variants.values():
                run_one()
            sync(device)
            round_s = (time.perf_counter() - t0) * 4 / 5
            _checks(sec, f"b{b}", last, unguarded_flagged, b)
            _anchored_checks(sec, f"b{b}", last, unguarded_flagged, b, anchored)
            sec.report(f"b{b}: ms inside the guard's conditioning per call (synchronised; steps after the first hit its cache)",
                       {"guarded_flagged": _phase_ms(g, variants["guarded_flagged"], device),
                        "anchored_flagged": _phase_ms(ga, anchored, device)})
            left = budget_s - (time.perf_counter() - t_start)
            share = left / (len(batches) - bi) if not quick else float("inf")
            n = max(3, min(reps, int(share // max(round_s, 1e-9)))) if not quick else reps
            if n < reps:
                sec.note(f"b{b}: {n} timing reps instead of {reps} (a round takes {round_s:.1f} s; "
                         f"{left:.0f} s of the section's {budget_s:.0f} s budget left)")
            res = paired_timing(variants, "unguarded", n, device, warmup=0)
            res.update(images_per_call=b, steps=steps, size=size, guidance_scale=7.5, concept=CONCEPT)
            res["refine_steps"] = getattr(last.get("guarded_flagged_report"), "refine_steps", None)
            res["anchored_refine_steps"] = getattr(last.get("anchored_flagged_report"), "refine_steps", None)
            sec.report(f"b{b}: latency", res)
            extra = res["median_s"]["guarded_flagged"] - res["median_s"]["unguarded"]
            sec.report(f"b{b}: guarded flagged minus unguarded, median ms", round(extra * 1e3, 2))
            extra = res["median_s"]["anchored_flagged"] - res["median_s"]["unguarded"]
            sec.report(f"b{b}: anchored flagged minus unguarded, median ms", round(extra * 1e3, 2))
    finally:
        g.detach()
    sec.guarded("refine micro-benchmark", lambda: _refine_bench(sec, device, quick))
    sec.report("section s", round(time.perf_counter() - t_start, 1))


def _checks(sec: Section, tag: str, last: dict, unguarded_flagged: np.ndarray, b: int) -> None:
    base = last["unguarded"]
    rep_b, rep_f = last["guarded_benign_report"], last["guarded_flagged_report"]
    flag_b = {r % b for r in rep_b.flagged.get(CONCEPT, [])}
    flag_f = {r % b for r in rep_f.flagged.get(CONCEPT, [])}
    sec.check(f"{tag}: unguarded images finite (random weights)",
              bool(np.isfinite(base).all() and np.isfinite(unguarded_flagged).all()), "finite")
    same = [np.array_equal(last["guarded_benign"][i], base[i]) for i in range(b) if i not in flag_b]
    sec.check(f"{tag}: benign prompts not flagged are bit-identical to unguarded", bool(same) and all(same),
              "bit-identical", identical=f"{sum(same)}/{len(same)}", benign_flagged=f"{len(flag_b)}/{b}")
    changed = [not np.array_equal(last["guarded_flagged"][i], unguarded_flagged[i]) for i in sorted(flag_f)]
    sec.check(f"{tag}: flagged prompts' images change", bool(flag_f) and all(changed), "all flagged changed",
              direct_flagged=f"{len(flag_f)}/{b}", flagged_changed=f"{sum(changed)}/{len(changed)}",
              refine_steps=rep_f.refine_steps)


def warm_clock(pipe: Any, device: torch.device, seconds: float, latent: int = 64) -> None:
    """Run UNet forwards (batch 8, ``latent`` x ``latent``) for ``seconds`` so the timed calls start at the
    GPU's working clock."""
    with torch.no_grad():
        lat = torch.randn(8, 4, latent, latent, device=device, dtype=pipe.unet.dtype)
        states = torch.randn(8, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=pipe.unet.dtype)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pipe.unet(lat, 500, encoder_hidden_states=states)
            sync(device)


def _anchored_checks(sec: Section, tag: str, last: dict, unguarded_flagged: np.ndarray, b: int,
                     anchored: Any) -> None:
    """``anchor_text`` on the device: flagged rows re-encoded and changed, and a row's image independent
    of which of its neighbours were toggled (the re-encode covers every prompt row, so its matmul
    shapes do not depend on the batch's composition)."""
    rep = last["anchored_flagged_report"]
    rows = {r % b for r in rep.anchored.get(CONCEPT, [])}
    flagged = {r % b for r in rep.flagged.get(CONCEPT, [])}
    images = last["anchored_flagged"]
    sec.check(f"{tag}: anchor_text re-encodes every flagged prompt", bool(flagged) and rows == flagged,
              "anchored rows == flagged rows", anchored=sorted(rows), flagged=sorted(flagged))
    sec.check(f"{tag}: anchored images finite and differ from unanchored guarded ones",
              bool(np.isfinite(images).all()) and all(not np.array_equal(images[i], last["guarded_flagged"][i])
                                                      for i in flagged), "finite, all differ")
    if b < 2:
        return
    full = images.copy()
    toggles = [[CONCEPT] if i % 2 == 0 else [] for i in range(b)]
    anchored(erase=toggles)
    mixed = last["anchored_flagged"]
    toggled = [np.array_equal(mixed[i], full[i]) for i in range(0, b, 2)]
    untoggled = [np.array_equal(mixed[i], unguarded_flagged[i]) for i in range(1, b, 2)]
    sec.check(f"{tag}: anchored mixed batch: toggled rows equal the all-toggled call, untoggled rows unguarded",
              all(toggled) and all(untoggled), "bit-identical",
              toggled=f"{sum(toggled)}/{len(toggled)}", untoggled=f"{sum(untoggled)}/{len(untoggled)}")


def _phase_ms(g: Any, fn: Any, device: torch.device) -> dict[str, float]:
    """Milliseconds one call spends in the guard's ``_condition`` (detection, anchor re-encode, refinement)
    and its ``_anchor_text`` part, each between device synchronisations (timed apart from the latency
    loop, whose numbers the extra synchronisations would change)."""
    times: dict[str, float] = {}
    for name in ("_condition", "_anchor_text"):
        original = getattr(g, name)

        def timed(*a: Any, _orig: Any = original, _name: str = name, **k: Any) -> Any:
            sync(device)
            t0 = time.perf_counter()
            out = _orig(*a, **k)
            sync(device)
            times[_name] = times.get(_name, 0.0) + 1e3 * (time.perf_counter() - t0)
            return out

        setattr(g, name, timed)
    try:
        fn()
    finally:
        for name in ("_condition", "_anchor_text"):
            delattr(g, name)
    return {k: round(v, 2) for k, v in times.items()}


def _refine_bench(sec: Section, device: torch.device, quick: bool) -> None:
    from benchmarks.gpu_check.refine_bench import _one

    # SD1.5 conditioning, batch 4 under CFG (8 rows, 4 flagged), one classifier, 8 steps
    shape = (12, 32, 8, 4, 1) if quick else (77, 768, 8, 4, 1)
    res = _one(device, 8, 3 if quick else 9, *shape)
    for k in ("before", "after"):
        sec.report(f"refine alone, {k} (8 steps, [8, {shape[0]}, {shape[1]}], 4 flagged): ms/step",
                   res[k]["ms_per_step"])
    sec.report("refine alone: speedup, max rel diff on moved rows",
               [res["speedup"], float(f"{res['max_rel_diff_moved_rows']:.3g}")])
    log(f"  D: refine bench {res}")
