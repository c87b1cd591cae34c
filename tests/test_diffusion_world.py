"""The diffusion world: data, vocabulary split, committed weights, detector, and the benchmark's guard protocol."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from erasekit.errors import ErasekitError
from erasekit.testing.diffusion_world import scenes
from erasekit.testing.diffusion_world.scenes import CONCEPTS, render_many, sample_scenes


# --- data and vocabulary (fast, no weights) ----------------------------------------------------
def test_scenes_are_deterministic_and_labelled():
    a = render_many(sample_scenes(8, seed=3))
    b = render_many(sample_scenes(8, seed=3))
    c = render_many(sample_scenes(8, seed=4))
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0
    fixed = sample_scenes(20, seed=0, fixed={"shape": "star", "style": "dots"})
    assert {s.shape for s in fixed} == {"star"} and {s.style for s in fixed} == {"dots"}


def test_every_concept_family_has_enough_members():
    assert len(CONCEPTS["shape"]) >= 6 and len(CONCEPTS["colour"]) >= 6 and len(CONCEPTS["style"]) >= 3


def _train_vocab() -> set[str]:
    words = {w for table in (scenes._TRAIN_SHAPE, scenes._TRAIN_COLOUR) for v in table.values() for w in v}
    return words | {t for v in scenes._TRAIN_STYLE.values() for t, _ in v}


def test_heldout_synonyms_and_templates_never_appear_in_training_vocabulary():
    train = _train_vocab()
    held = {w for table in (scenes._HELDOUT_SHAPE, scenes._HELDOUT_COLOUR, scenes._RARE_SHAPE, scenes._RARE_COLOUR)
            for v in table.values() for w in v}
    held |= {t for table in (scenes._HELDOUT_STYLE, scenes._RARE_STYLE) for v in table.values() for t, _ in v}
    assert not held & train
    assert not set(scenes._HELDOUT_TEMPLATES) & set(scenes._TRAIN_TEMPLATES)
    for fam, table in (("shape", scenes._HELDOUT_SHAPE), ("colour", scenes._HELDOUT_COLOUR),
                       ("style", scenes._HELDOUT_STYLE), ("shape", scenes._RARE_SHAPE),
                       ("colour", scenes._RARE_COLOUR), ("style", scenes._RARE_STYLE)):
        assert set(table) == set(CONCEPTS[fam])


def test_training_synonyms_are_the_training_vocabulary_only():
    train = _train_vocab()
    for concept in scenes.all_concepts():
        synonyms = scenes.training_synonyms(concept)
        assert synonyms and set(synonyms) <= train
    assert scenes.training_synonyms("dots")[0] == "with dots" and "spotted" in scenes.training_synonyms("dots")
    with pytest.raises(KeyError, match="orb"):
        scenes.training_synonyms("orb")


# --- the committed world (loads real weights; module-scoped) ----------------------------------
@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    from erasekit.testing.diffusion_world import load_world

    return load_world()


def test_world_is_a_from_pretrained_sd_pipeline(world):
    from diffusers import StableDiffusionPipeline

    index = json.loads((world.weights_dir / "pipeline" / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "BertModel"]
    assert isinstance(world.pipe, StableDiffusionPipeline)
    emb, _ = world.pipe.encode_prompt(["a red circle"], "cpu", 1, False)
    assert emb.shape == (1, world.pipe.tokenizer.model_max_length, 384)


def test_prompt_sets_respect_the_split(world):
    train = _train_vocab()
    held_words = {w for t in (scenes._HELDOUT_SHAPE, scenes._HELDOUT_COLOUR, scenes._RARE_SHAPE, scenes._RARE_COLOUR)
                  for v in t.values() for w in v}
    # Known overlap: the rare synonym "valentine" is a word of the training synonym "valentine heart".
    inside_training = {w for w in held_words if any(f" {w} " in f" {t} " for t in train)}
    assert inside_training == {"valentine"}
    held_words -= inside_training
    for concept in ("circle", "purple", "checker"):
        for p in world.train_prompts(concept, 40, seed=0) + world.retain_prompts(concept, 40, seed=0):
            assert not any(f" {w} " in f" {p} " for w in held_words), p
        syn = {"circle": scenes._TRAIN_SHAPE, "purple": scenes._TRAIN_COLOUR}.get(concept)
        if syn is not None:  # retain prompts never name the concept
            for p in world.retain_prompts(concept, 60, seed=1):
                assert not any(f" {w} " in f" {p} " for w in syn[concept]), p
        for spec in world.heldout_specs(concept, 20, seed=0):
            assert not any(t.format(x="") .strip() in spec.prompt for t in scenes._TRAIN_TEMPLATES[2:])
    assert world.train_prompts("star", 5, seed=7) == world.train_prompts("star", 5, seed=7)
    with pytest.raises(ErasekitError, match="concept"):
        world.train_prompts("dragon", 3)
    assert train  # the vocabulary helper itself is non-trivial


def test_detector_is_at_least_98_percent_on_heldout_real_scenes(world):
    from benchmarks.diffusion_world import detector_accuracy

    acc = detector_accuracy(world, 600)
    assert min(acc.values()) >= 0.98, acc


# --- the benchmark -----------------------------------------------------------------------------
class _BlankingGuard:
    """A test guard with the contract's shape: erasing replaces the text conditioning with zeros."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._depth = 0

        def pre(module, args, kwargs):
            if self._depth:
                kwargs = dict(kwargs)
                kwargs["encoder_hidden_states"] = torch.zeros_like(kwargs["encoder_hidden_states"])
            return args, kwargs

        self.handle = pipe.unet.register_forward_pre_hook(pre, with_kwargs=True)

    @contextlib.contextmanager
    def erasing(self, erase):
        self._depth += bool(erase)
        try:
            yield
        finally:
            self._depth -= bool(erase)

    def __call__(self, *args, erase=None, **kwargs):
        with self.erasing(erase):
            return self.pipe(*args, **kwargs)


@pytest.mark.slow
def test_quick_benchmark_baseline_and_foreign_guard(world, tmp_path):
    from benchmarks.diffusion_world import ATTACKS, NoGuard, run_benchmark

    res = run_benchmark(NoGuard, ["circle"], tmp_path / "a", quick=True, world=world, progress=False)
    assert set(res["summary_crr"]) == set(ATTACKS)
    for attack in ATTACKS:
        crr = res["per_concept"]["circle"]["crr"][attack]
        assert crr["unguarded"] == crr["guarded"] and 0.0 <= crr["unguarded"] <= 1.0
    assert res["per_concept"]["circle"]["utility"]["bit_identical_rate"] == 1.0
    for name in ("results.json", "table.md", "grid.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0

    # bit-identical rerun from the same seeds (CPU)
    again = run_benchmark(NoGuard, ["circle"], tmp_path / "b", quick=True, world=world, progress=False)
    assert again["per_concept"] == res["per_concept"]

    # any object with the guard protocol plugs in without benchmark changes
    made: list[_BlankingGuard] = []
    try:
        blank = run_benchmark(lambda pipe: made.append(_BlankingGuard(pipe)) or made[-1], ["circle"],
                              tmp_path / "c", quick=True, world=world, progress=False)
    finally:
        for g in made:
            g.handle.remove()
    util = blank["per_concept"]["circle"]["utility"]
    assert util["bit_identical_rate"] < 1.0 and util["pixel_drift_mean_abs"] > 0
    assert blank["per_concept"]["circle"]["crr"]["direct"]["unguarded"] == res["per_concept"]["circle"]["crr"]["direct"]["unguarded"]
    assert blank["per_concept"]["circle"]["crr"]["direct"]["guarded"] < res["per_concept"]["circle"]["crr"]["direct"]["unguarded"]
