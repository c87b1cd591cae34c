"""CGCE packs with a separate detection head (``detect_*``): the ONNX detector is the head, the twin
that refines stays the pack's own model, the guard flags by the head, and bad settings are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from erasekit.classifiers.cgce import CGCEClassifier
from erasekit.classifiers.detector import fit_detector
from erasekit.errors import ErasekitError, PackError
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.diffusers_calibrate import calibrate_cgce, concept_embedding, encode_conditioning
from tests._irece import red_concept, with_hp
from tests.test_diffusers_guard import BLUE, KW, RED, _gen, first_conditioning, guarded_first_conditioning

PHRASES = ["red", "crimson", "scarlet"]


@pytest.fixture(scope="module")
def packs(pipe):
    concept = red_concept()
    return calibrate_cgce(pipe, concept), calibrate_cgce(pipe, concept, detect_phrases=PHRASES)


def test_head_is_the_onnx_detector_and_the_twin_is_unchanged(pipe, packs):
    single, headed = packs
    hp = headed.hyperparameters
    assert hp["detect_tau"] == 0.05 and hp["detect_flat"] == 0 and hp["detect_phrases"] == PHRASES  # defaults filled
    assert 0 < hp["detect_C"] and 0.5 <= hp["detect_train_accuracy"] <= 1
    for name in ("concept_embedding", "twin_weight", "twin_bias"):  # refinement: the same model as without a head
        assert torch.equal(headed.tensors[name], single.tensors[name])
    assert headed.classifier_onnx != single.classifier_onnx
    concept = red_concept()
    unsafe = encode_conditioning(pipe, concept.forget).numpy()
    safe = encode_conditioning(pipe, concept.retain).numpy()
    probe = np.concatenate([unsafe[:3], safe[:3]])
    empty = encode_conditioning(pipe, [""]).numpy()  # the unconditional prompt joins the negatives (1 per 20)
    negatives = np.concatenate([safe, np.repeat(empty, max(1, len(safe) // 20), axis=0)])
    expected = fit_detector(unsafe, negatives, concept_embedding(pipe, PHRASES).numpy(), tau=0.05, flat=False)
    got = CGCEClassifier.from_pack(headed).scores(torch.from_numpy(probe))
    np.testing.assert_allclose(got, expected.predict_proba(probe.reshape(len(probe), -1))[:, 1], atol=1e-5)


def test_round_trip_keeps_the_head(tmp_path, packs):
    _, headed = packs
    headed.save_pretrained(tmp_path / "p")
    loaded = ConceptPack.from_pretrained(tmp_path / "p")
    assert loaded.classifier_onnx == headed.classifier_onnx
    assert loaded.hyperparameters["detect_phrases"] == PHRASES


def test_guard_flags_by_the_head_and_leaves_benign_rows_alone(pipe, packs):
    _, headed = packs
    with first_conditioning(pipe) as seen:
        unguarded = pipe([RED, BLUE], generator=_gen(), **KW).images
    ucond = seen[0]
    images, cond, report = guarded_first_conditioning(pipe, [headed], [RED, BLUE], ["red"])
    np.testing.assert_allclose(report.scores["red"], CGCEClassifier.from_pack(headed).scores(ucond), atol=1e-6)
    assert report.flagged["red"] == [2] and report.refine_steps > 0
    assert torch.equal(cond[3], ucond[3]) and torch.equal(images[1], unguarded[1])  # the benign row
    assert not torch.equal(cond[2], ucond[2])


@pytest.mark.parametrize(("hp", "field"), [
    ({"detect_tau": 0.0}, "detect_tau"),
    ({"detect_flat": 2}, "detect_flat"),
    ({"detect_phrases": []}, "detect_phrases"),
    ({"detect_phrases": "red"}, "detect_phrases"),
    ({"detect_phrases": ["red", ""]}, "detect_phrases"),
])
def test_bad_head_settings_are_refused_at_calibration(pipe, hp, field):
    with pytest.raises(ErasekitError, match=field):
        calibrate_cgce(pipe, red_concept(), **hp)


def test_a_loaded_pack_with_bad_head_settings_is_refused(tmp_path, packs):
    _, headed = packs
    with pytest.raises(PackError, match="detect_flat"):
        with_hp(headed, detect_flat=3).validate()
    with pytest.raises(PackError, match="detect_phrases"):
        with_hp(headed, detect_phrases=[7]).validate()
