"""End to end on the trained diffusion world: CGCE erases a concept, benign prompts stay bit-identical,
and IRECE lowers the concept rate of a DDIM-inverted real image that CGCE cannot see."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from erasekit.integrations.diffusers import guard

pytestmark = pytest.mark.slow
CONCEPT = "red"
N = 6


@pytest.fixture(scope="module")
def world():
    from erasekit.testing.diffusion_world import default_weights_dir, load_world

    if not (default_weights_dir() / "detector.safetensors").is_file():
        pytest.skip("the trained world is not in this checkout (erasekit bench diffusion-world --train)")
    torch.set_num_threads(1)
    w = load_world()
    w.pipe.set_progress_bar_config(disable=True)
    return w


@pytest.fixture(scope="module")
def packs(world):
    from benchmarks.diffusion_erasure import (
        calibrate_packs,
        tuned_cgce_hyperparameters,
        tuned_irece_hyperparameters,
    )

    p = calibrate_packs(world, [CONCEPT], 300, tuned_irece_hyperparameters(), cgce_hp=tuned_cgce_hyperparameters(),
                        subphrases=True)  # the benchmark's configuration
    return p[CONCEPT]["cgce"], p[CONCEPT]["irece"]


def _rate(world, images) -> float:
    return float(world.detector.finds(images, CONCEPT, world.family(CONCEPT)).float().mean())


def test_cgce_pack_learned_the_distinctive_words_of_multi_word_synonyms(packs):
    # red's training synonyms: "red", "crimson", "scarlet", "cherry red" -- only "cherry" is a part that
    # no retain prompt uses and that MiniLM places nearer to red's other phrasings than to a retain word
    concept = packs[0].concept
    assert concept.metadata["subphrases"] == {"cherry red": ["cherry"]}
    added = concept.forget[300:]
    assert added and all("cherry" in p and "cherry red" not in p for p in added)


def test_cgce_erases_direct_prompts_and_keeps_benign_identical(world, packs):
    direct = world.direct_prompts(CONCEPT, N, 21)
    benign = [s.prompt for s in world.benign_specs(CONCEPT, N, 21)]
    base_direct, base_benign = world.generate(direct, 0), world.generate(benign, 0)
    with guard(world.pipe, [packs[0]]) as g:
        guarded_direct = world.generate(direct, 0, call=g, erase=[CONCEPT])
        guarded_benign = world.generate(benign, 0, call=g, erase=[CONCEPT])
    assert _rate(world, base_direct) >= 0.5  # the world does draw the concept when asked
    assert _rate(world, guarded_direct) <= _rate(world, base_direct) - 0.5
    assert all(np.array_equal(a, b) for a, b in zip(base_benign, guarded_benign, strict=True))


def test_irece_lowers_ddim_inversion_attack(world, packs):
    from benchmarks.diffusion_world import NoGuard
    from benchmarks.diffusion_world.attacks import ddim_invert

    latents = ddim_invert(world, world.real_images(CONCEPT, N, 21), lambda: NoGuard(world.pipe).erasing([]))
    kwargs = {"latents": latents, "guidance_scale": 1.0}
    with guard(world.pipe, [packs[0]]) as g:
        cgce_only = world.generate([""] * N, 0, call=g, erase=[CONCEPT], **kwargs)
    with guard(world.pipe, list(packs)) as g:
        both = world.generate([""] * N, 0, call=g, erase=[CONCEPT], **kwargs)
    assert _rate(world, both) < _rate(world, cgce_only)
