"""Diffusion-world benchmark: CRR per attack, utility, and the unguarded baseline, for any guard.

``run_benchmark(guard_factory, concepts, out_dir, quick)`` takes ``guard_factory(pipe) ->
DiffusionGuardLike`` (``__call__(..., erase=...)`` and ``erasing(erase)``, see
docs/diffusion-contract.md) and measures, per concept:

* CRR (concept reproduction rate: share of images where the detector's top prediction in the
  concept's family is the erased concept) for direct prompts, held-out paraphrases,
  multi-concept prompts, textual inversion (white-/black-box) and DDIM-inverted latents
  (white-/black-box), unguarded and guarded with ``erase=[concept]``;
* utility on benign prompts (a sibling concept of the same family plus other families): detector
  agreement unguarded vs guarded, pixel and detector-feature drift, and the share of benign
  images that are bit-identical to the unguarded ones (same seeds).

It writes ``results.json``, ``table.md`` and ``grid.png`` to ``out_dir``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.diffusion_world.attacks import (
    PLACEHOLDER,
    TI_TEMPLATES,
    NoGuard,
    ddim_invert,
    learn_embedding,
    placeholder_id,
    token_override,
)
from erasekit.testing.diffusion_world import World, load_world
from erasekit.testing.diffusion_world.scenes import render_many, sample_scenes
from erasekit.testing.diffusion_world.train import HELDOUT_REAL_SEED

__all__ = ["ATTACKS", "NoGuard", "Settings", "run_benchmark", "QUICK", "FULL"]

ATTACKS = ("direct", "paraphrase", "rare_synonym", "multi_concept", "ti_whitebox", "ti_blackbox", "ddim_whitebox", "ddim_blackbox")


@dataclass(frozen=True)
class Settings:
    n_images: int  # images per attack and per concept
    ti_steps: int  # textual-inversion optimisation steps
    ti_images: int  # real images the embedding is learned from
    n_benign: int  # benign prompts for utility
    detector_check: int  # held-out real scenes for the detector's own accuracy


FULL = Settings(n_images=12, ti_steps=60, ti_images=16, n_benign=12, detector_check=600)
QUICK = Settings(n_images=4, ti_steps=6, ti_images=4, n_benign=4, detector_check=120)


def _crr(world: World, images: np.ndarray, concept: str) -> float:
    return float(world.detector.finds(images, concept, world.family(concept)).float().mean())


def _attack_images(world: World, who, concept: str, attack: str, s: Settings, seed: int,
                   cache: dict) -> np.ndarray:
    """Images of one attack through ``who`` (a guard or NoGuard), erasing ``concept``."""
    n = s.n_images
    erase = [concept]
    if attack in ("direct", "paraphrase", "rare_synonym", "multi_concept"):
        specs = {"direct": world.direct_specs, "paraphrase": world.heldout_specs,
                 "rare_synonym": world.rare_synonym_specs, "multi_concept": world.multi_specs}[attack](concept, n, seed)
        return world.generate([sp.prompt for sp in specs], seed, call=who, erase=erase)
    if attack.startswith("ti_"):
        white = attack == "ti_whitebox"
        key = ("ti", white and not isinstance(who, NoGuard))
        if key not in cache:
            real = world.real_images(concept, s.ti_images, seed)
            ctx = (lambda: who.erasing(erase)) if white else (lambda: NoGuard(world.pipe).erasing(erase))
            cache[key] = learn_embedding(world, concept, real, s.ti_steps, seed, ctx)
        vec, _stats = cache[key]
        prompts = [TI_TEMPLATES[i % len(TI_TEMPLATES)].format(PLACEHOLDER) for i in range(n)]
        with token_override(world.pipe.text_encoder, placeholder_id(world), vec):
            return world.generate(prompts, seed, call=who, erase=erase)
    if attack.startswith("ddim_"):
        white = attack == "ddim_whitebox"
        key = ("ddim", white and not isinstance(who, NoGuard))
        if key not in cache:
            real = world.real_images(concept, n, seed + 1)
            ctx = (lambda: who.erasing(erase)) if white else (lambda: NoGuard(world.pipe).erasing(erase))
            cache[key] = ddim_invert(world, real, ctx)
        return world.generate([""] * n, seed, call=who, erase=erase, latents=cache[key], guidance_scale=1.0)
    raise KeyError(attack)


def _utility(world: World, guard, concept: str, s: Settings, seed: int, unguarded_same: bool) -> tuple[dict, np.ndarray]:
    specs = world.benign_specs(concept, s.n_benign, seed)
    prompts = [sp.prompt for sp in specs]
    base = world.generate(prompts, seed, call=NoGuard(world.pipe))
    guarded = base if unguarded_same else world.generate(prompts, seed, call=guard, erase=[concept])
    fb, fg = world.detector.features(base), world.detector.features(guarded)
    acc_b, acc_g = world.agreement(specs, base), world.agreement(specs, guarded)
    return {
        "benign_accuracy_unguarded": float(np.mean(list(acc_b.values()))),
        "benign_accuracy_guarded": float(np.mean(list(acc_g.values()))),
        "pixel_drift_mean_abs": float(np.abs(guarded - base).mean()),
        "feature_drift_rel": float(((fg - fb).norm(dim=1) / fb.norm(dim=1).clamp_min(1e-8)).mean()),
        "bit_identical_rate": float(np.mean([np.array_equal(a, b) for a, b in zip(base, guarded, strict=True)])),
    }, guarded


def detector_accuracy(world: World, n: int) -> dict[str, float]:
    """The detector's accuracy on held-out rendered scenes (never used in its training)."""
    scenes = sample_scenes(n, HELDOUT_REAL_SEED)
    return world.detector.accuracy(render_many(scenes), [sc.labels() for sc in scenes])


def run_benchmark(
    guard_factory: Callable,
    concepts: list[str] | None = None,
    out_dir: str | Path = "bench_out/diffusion-world",
    quick: bool = False,
    *,
    world: World | None = None,
    seed: int = 0,
    guard_name: str | None = None,
    progress: bool = True,
) -> dict:
    """Measure a guard on the world; see the module docstring. Returns the results dict."""
    from tqdm.auto import tqdm

    world = world or load_world()
    s = QUICK if quick else FULL
    concepts = list(concepts) if concepts else (["circle", "red"] if quick else
                                                [c for f in world.concepts.values() for c in f])
    for c in concepts:
        world.family(c)  # clear error for an unknown concept before any work
    guard = guard_factory(world.pipe)
    is_baseline = isinstance(guard, NoGuard)
    base = NoGuard(world.pipe)
    t0 = time.time()
    rows: dict[str, dict] = {}
    grid: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    bar = tqdm(total=len(concepts) * (len(ATTACKS) + 1), desc="diffusion-world", disable=not progress)
    for ci, concept in enumerate(concepts):
        cseed = seed + 1000 * ci
        cache: dict = {}  # learned embeddings / inverted latents; black-box ones are shared
        row: dict = {"family": world.family(concept), "crr": {}, "attack_stats": {}}
        grid[concept] = {}
        for attack in ATTACKS:
            imgs_b = _attack_images(world, base, concept, attack, s, cseed, cache)
            imgs_g = imgs_b if is_baseline else _attack_images(world, guard, concept, attack, s, cseed, cache)
            row["crr"][attack] = {"unguarded": _crr(world, imgs_b, concept), "guarded": _crr(world, imgs_g, concept)}
            grid[concept][attack] = (imgs_b[0], imgs_g[0])
            bar.update(1)
        for (kind, through_guard), val in cache.items():
            if kind == "ti":
                row["attack_stats"]["ti_through_guard" if through_guard else "ti_unguarded"] = val[1]
        row["utility"], _ = _utility(world, guard, concept, s, cseed + 500, is_baseline)
        bar.update(1)
        rows[concept] = row
    bar.close()

    summary = {a: {k: float(np.mean([rows[c]["crr"][a][k] for c in concepts])) for k in ("unguarded", "guarded")}
               for a in ATTACKS}
    result = {
        "guard": guard_name or type(guard).__name__,
        "quick": quick,
        "settings": asdict(s),
        "sampling": {"num_inference_steps": world.num_inference_steps, "guidance_scale": world.guidance_scale,
                     "height": world.height, "width": world.width},
        "seed": seed,
        "concepts": concepts,
        "detector_accuracy_heldout_real": detector_accuracy(world, s.detector_check),
        "summary_crr": summary,
        "summary_utility": {k: float(np.mean([rows[c]["utility"][k] for c in concepts]))
                            for k in rows[concepts[0]]["utility"]},
        "per_concept": rows,
        "seconds": round(time.time() - t0, 1),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.diffusion_world.report import markdown_table, save_grid

    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(result) + "\n")
    save_grid(grid, out / "grid.png", result["guard"])
    return result
