"""CGCE anchors on a tiny random SD pipeline: calibration stores the anchor twin, the guard pulls
flagged rows onto it (above its target) while pushing them off the concept; nothing else moves."""

from __future__ import annotations

import pytest
import torch

from erasekit.classifiers.cgce import CGCEClassifier
from erasekit.guardrails.concept import Concept
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.diffusers_calibrate import calibrate_cgce, encode_conditioning
from tests._irece import red_concept
from tests.test_diffusers_guard import BLUE, RED, SHAPES, _with, guarded_first_conditioning

BACKS = ("white", "black", "grey")


@pytest.fixture(scope="module")
def anchor() -> Concept:
    """"green" as the anchor of "red": its prompts are also red's retain prompts (dropped from its negatives)."""
    return Concept("green", forget=[f"a green {s} on a {b} background" for s in SHAPES for b in BACKS],
                   keywords=["green"])


@pytest.fixture(scope="module")
def packs(pipe, anchor):
    concept = red_concept()
    return calibrate_cgce(pipe, concept), calibrate_cgce(pipe, concept, anchor=anchor)


def _first_conditioning(pipe, pack, prompts, erase):
    """Images and the conditioning the first cross-attention received at the first step."""
    return guarded_first_conditioning(pipe, [pack], prompts, erase)


def test_anchor_pack_stores_a_twin_that_separates_the_anchor(tmp_path, pipe, packs, anchor):
    plain, anchored = packs
    hp = anchored.hyperparameters
    assert "anchor_twin_weight" not in plain.tensors and "anchor" not in plain.hyperparameters
    assert hp["anchor"] == 1 and hp["anchor_prompt"].startswith("green: 15 prompts")
    assert hp["anchor_target_logit"] > 0 > hp["anchor_negative_logit"]
    assert torch.equal(anchored.tensors["twin_weight"], plain.tensors["twin_weight"])  # the concept's own detector
    clf = CGCEClassifier.from_pack(ConceptPack.from_pretrained(anchored.save_pretrained(tmp_path / "a")))
    z = clf.anchor_twin.logits(encode_conditioning(pipe, [anchor.forget[0], RED, BLUE]))
    assert z[0] > 0 and z[1] < 0  # green prompt vs red prompt


def test_flagged_rows_move_onto_the_anchor_benign_rows_bit_identical(pipe, packs):
    plain, anchored = packs
    off_img, off_cond, off_report = _first_conditioning(pipe, plain, [RED, BLUE], ["red"])
    # On this random model, leaving "red" alone already lands past the calibrated anchor target;
    # aim past where the plain refinement ends, so only the anchor can get the row there.
    z_off = float(CGCEClassifier.from_pack(anchored).anchor_twin.logits(off_cond[2:3])[0])
    anchored = _with(anchored, anchor_target_logit=z_off + 3.0)
    on_img, on_cond, report = _first_conditioning(pipe, anchored, [RED, BLUE], ["red"])
    assert report.flagged["red"] == off_report.flagged["red"] == [2]  # CFG rows [uncond x2, RED, BLUE]
    clf = CGCEClassifier.from_pack(anchored)
    assert float(clf.anchor_twin.logits(on_cond[2:3])[0]) >= z_off + 3.0 - 1e-2  # onto the anchor
    assert float(clf.twin.logits(on_cond[2:3])[0]) <= clf.target_logit + 1e-2  # and still off the concept
    assert torch.equal(on_cond[3], off_cond[3]) and torch.equal(on_img[1], off_img[1])  # benign: bit-identical
    assert torch.equal(on_cond[:2], off_cond[:2])  # unconditional rows untouched
    assert not torch.equal(on_cond[2], off_cond[2]) and not torch.equal(on_img[0], off_img[0])


def test_anchor_switched_off_is_the_plain_guard(pipe, packs):
    plain, anchored = packs
    off_img, off_cond, _ = _first_conditioning(pipe, plain, [RED, BLUE], ["red"])
    img, cond, _ = _first_conditioning(pipe, _with(anchored, anchor=0), [RED, BLUE], ["red"])
    assert torch.equal(cond, off_cond) and torch.equal(img, off_img)


def test_explicit_anchor_negatives_are_used(pipe):
    concept = red_concept()
    anchor = Concept("green", forget=[f"a green {s} on a {b} background" for s in SHAPES for b in BACKS],
                     retain=[f"a blue {s} on a white background" for s in SHAPES], keywords=["green"])
    pack = calibrate_cgce(pipe, concept, anchor=anchor)
    default = calibrate_cgce(pipe, concept, anchor=Concept("green", forget=list(anchor.forget), keywords=["green"]))
    # the default drops the anchor's own prompts from red's retain list: exactly the 15 blue ones remain
    assert not torch.equal(pack.tensors["anchor_twin_weight"], default.tensors["anchor_twin_weight"])
    same = Concept("green", forget=list(anchor.forget), keywords=["green"],
                   retain=[f"a blue {s} on a {b} background" for s in SHAPES for b in BACKS])
    assert torch.equal(calibrate_cgce(pipe, concept, anchor=same).tensors["anchor_twin_weight"],
                       default.tensors["anchor_twin_weight"])
