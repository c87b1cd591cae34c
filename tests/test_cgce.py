"""CGCE classifier pieces: numpy / ONNX / torch twin agree, refinement moves only flagged rows, packs validate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from erasekit.classifiers import cgce
from erasekit.classifiers.detector import OnnxDetector, fit_detector
from erasekit.classifiers.features import concept_features_np, concept_features_torch
from erasekit.classifiers.onnx_export import export_detector
from erasekit.classifiers.twin import TorchTwin, refine
from erasekit.errors import PackError
from erasekit.guardrails.concept import Concept
from erasekit.guardrails.fingerprint import ModelFingerprint
from erasekit.guardrails.pack import ConceptPack

T, D = 12, 16


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    concept = rng.normal(size=(2, D)).astype(np.float32)
    safe = rng.normal(size=(80, T, D)).astype(np.float32)
    unsafe = rng.normal(size=(80, T, D)).astype(np.float32)
    unsafe[:, 3:5] += 2 * concept  # the concept's tokens appear somewhere in the prompt
    detector = fit_detector(unsafe, safe, concept)
    return detector, export_detector(detector), concept, safe, unsafe


def test_features_numpy_and_torch_agree():
    rng = np.random.default_rng(1)
    e, c = rng.normal(size=(3, T, D)).astype(np.float32), rng.normal(size=(4, D)).astype(np.float32)
    a = concept_features_np(e, c, 0.1)
    b = concept_features_torch(torch.from_numpy(e), torch.from_numpy(c), 0.1).numpy()
    assert a.shape == (3, 2 * D + 1)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_onnx_sklearn_and_twin_agree(fitted):
    detector, onnx_bytes, _, safe, unsafe = fitted
    x = np.concatenate([unsafe[:10], safe[:10]])
    p_sk = detector.predict_proba(x.reshape(len(x), -1))[:, 1]
    p_onnx = OnnxDetector(onnx_bytes, T, D).predict_proba(x)
    p_twin = torch.sigmoid(TorchTwin.from_detector(detector).logits(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(p_onnx, p_sk, atol=1e-5)
    np.testing.assert_allclose(p_twin, p_sk, atol=1e-5)
    assert (p_sk[:10] > 0.5).all() and (p_sk[10:] < 0.5).all()


def test_refine_moves_flagged_rows_under_target_only(fitted):
    detector, _, _, safe, unsafe = fitted
    twin = TorchTwin.from_detector(detector)
    x = torch.from_numpy(np.concatenate([unsafe[:4], safe[:4]]))
    flagged = torch.sigmoid(twin.logits(x)) > 0.5
    assert flagged.tolist() == [True] * 4 + [False] * 4
    result = refine(x, [twin], flagged[None], etas=[50.0], max_steps=100, targets=[0.2])
    assert torch.equal(result.embeds[4:], x[4:])  # benign rows bit-identical
    assert not torch.equal(result.embeds[:4], x[:4])
    assert (torch.sigmoid(twin.logits(result.embeds[:4])) <= 0.2 + 1e-4).all()
    assert result.steps >= 1


def test_refine_zero_steps_changes_nothing(fitted):
    detector, _, _, _, unsafe = fitted
    twin = TorchTwin.from_detector(detector)
    x = torch.from_numpy(unsafe[:2])
    result = refine(x, [twin], torch.ones(1, 2, dtype=torch.bool), etas=[1.0], max_steps=0, targets=[0.5])
    assert torch.equal(result.embeds, x)


@pytest.mark.parametrize(("kwargs", "names"), [
    ({"etas": [1.0, 1.0]}, "etas"),                          # one per twin, not a broadcast
    ({"target_logits": [-5.0, -5.0]}, "target_logits"),
    ({"anchors": [False, True]}, "anchors"),
    ({"rows": torch.ones(2, 2, dtype=torch.bool)}, "rows"),  # [C, N] with C = twins
])
def test_refine_refuses_per_twin_arguments_of_the_wrong_length(fitted, kwargs, names):
    detector, _, _, _, unsafe = fitted
    twin = TorchTwin.from_detector(detector)
    args = {"rows": torch.ones(1, 2, dtype=torch.bool), "etas": [1.0], "target_logits": [-5.0], **kwargs}
    with pytest.raises(ValueError, match=names):
        refine(torch.from_numpy(unsafe[:2]), [twin], args.pop("rows"), max_steps=3, **args)


def test_refine_is_straight_through_for_gradients(fitted):
    detector, _, _, _, unsafe = fitted
    twin = TorchTwin.from_detector(detector)
    x = torch.from_numpy(unsafe[:2]).clone().requires_grad_(True)
    out = refine(x, [twin], torch.ones(1, 2, dtype=torch.bool), etas=[1.0], max_steps=5, targets=[0.5]).embeds
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _pack(fitted, **hp_over):
    detector, onnx_bytes, *_ = fitted
    hp = {**cgce.DEFAULTS, "seq_len": T, "embed_dim": D, **hp_over}
    fp = ModelFingerprint("CLIPTextModel", D, 2, 100, "0" * 64)
    return ConceptPack(Concept("red", forget=["a red ball"], retain=["a blue ball"]), "cgce", fp,
                       cgce.pack_tensors_from_detector(detector), hp, onnx_bytes)


def test_pack_round_trip_and_classifier(tmp_path, fitted):
    pack = _pack(fitted)
    loaded = ConceptPack.from_pretrained(pack.save_pretrained(tmp_path / "p"))
    clf = cgce.CGCEClassifier.from_pack(loaded)
    _, _, _, safe, unsafe = fitted
    scores = clf.scores(torch.from_numpy(np.concatenate([unsafe[:3], safe[:3]])))
    assert (scores[:3] > 0.5).all() and (scores[3:] < 0.5).all()


@pytest.mark.parametrize("override, field", [
    ({"target": 0.9}, "hyperparameters.target"),
    ({"eta": -1.0}, "hyperparameters.eta"),
    ({"max_steps": 2.5}, "hyperparameters.max_steps"),
    ({"embed_dim": D + 1}, "tensors.concept_embedding"),
    ({"threshold": True}, "hyperparameters.threshold"),
])
def test_bad_hyperparameters_are_refused(fitted, override, field):
    with pytest.raises(PackError) as err:
        _pack(fitted, **override).validate()
    assert err.value.field == field and err.value.fix


def test_missing_classifier_and_bad_onnx_are_refused(fitted):
    pack = _pack(fitted)
    pack.classifier_onnx = None
    with pytest.raises(PackError, match="needs a classifier"):
        pack.validate()
    pack.classifier_onnx = b"not onnx"
    with pytest.raises(PackError, match="onnxruntime cannot load"):
        cgce.CGCEClassifier.from_pack(pack)


def test_attention_only_detector_still_exports_and_agrees(fitted):
    _, _, concept, safe, unsafe = fitted
    detector = fit_detector(unsafe, safe, concept, flat=False)
    x = np.concatenate([unsafe[:5], safe[:5]])
    p_sk = detector.predict_proba(x.reshape(len(x), -1))[:, 1]
    p_onnx = OnnxDetector(export_detector(detector), T, D).predict_proba(x)
    twin = TorchTwin.from_detector(detector)
    assert not twin.flat and twin.weight.shape[0] == 2 * D + 1
    np.testing.assert_allclose(p_onnx, p_sk, atol=1e-5)
    np.testing.assert_allclose(torch.sigmoid(twin.logits(torch.from_numpy(x))).numpy(), p_sk, atol=1e-5)


def test_flat_detector_reads_every_token(fitted):
    detector, *_ = fitted
    twin = TorchTwin.from_detector(detector)
    assert twin.flat and twin.weight.shape[0] == 2 * D + 1 + T * D


def test_refine_reaches_a_far_logit_target_in_few_steps(fitted):
    detector, _, _, _, unsafe = fitted
    twin = TorchTwin.from_detector(detector)
    x = torch.from_numpy(unsafe[:6])
    z0 = twin.logits(x)
    goal = float(z0.min()) - 3 * float(z0.max() - z0.min()) - 5.0  # well past every safe prompt
    result = refine(x, [twin], torch.ones(1, 6, dtype=torch.bool), etas=[1.0], max_steps=20, target_logits=[goal])
    assert (twin.logits(result.embeds) <= goal + 1e-2).all()
    assert result.steps <= 10  # Gauss-Newton steps, not a fixed learning rate


def test_refine_two_classifiers_each_under_its_own_target(fitted):
    _, _, concept, safe, unsafe = fitted
    rng = np.random.default_rng(5)
    other = rng.normal(size=(2, D)).astype(np.float32)
    unsafe2 = safe.copy()
    unsafe2[:, 6:8] += 2 * other
    twins = [TorchTwin.from_detector(fit_detector(unsafe, safe, concept, C=0.1)),
             TorchTwin.from_detector(fit_detector(unsafe2, safe, other, C=0.1))]
    x = torch.from_numpy(np.concatenate([unsafe[:3], unsafe2[:3], safe[:2]]))
    rows = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    rows[1, 0] = True  # row 0 is erased for both concepts
    result = refine(x, twins, rows, etas=[1.0, 1.0], max_steps=20, target_logits=[-4.0, -4.0])
    for c, tw in enumerate(twins):
        assert (tw.logits(result.embeds)[rows[c]] <= -4.0 + 1e-2).all()
    assert torch.equal(result.embeds[6:], x[6:])


def test_refine_under_inference_mode_matches_no_grad(fitted):
    detector, _, _, _, unsafe = fitted
    twin = TorchTwin.from_detector(detector)
    x = torch.from_numpy(unsafe[:2])
    rows = torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        a = refine(x, [twin], rows, etas=[1.0], max_steps=5, target_logits=[-3.0]).embeds
    with torch.inference_mode():
        b = refine(x.clone(), [twin], rows.clone(), etas=[1.0], max_steps=5, target_logits=[-3.0]).embeds
    torch.testing.assert_close(a, b.clone())


def test_margin_sets_the_refinement_target(fitted):
    pack = _pack(fitted, safe_logit=-2.0, unsafe_logit=2.0, margin=1.5, target=0.01)
    clf = cgce.CGCEClassifier.from_pack(pack)
    assert clf.target_logit == pytest.approx(-2.0 - 1.5 * 4.0)
    clf = cgce.CGCEClassifier.from_pack(_pack(fitted, safe_logit=-2.0, unsafe_logit=2.0, margin=0.0, target=0.01))
    assert clf.target_logit == pytest.approx(np.log(0.01 / 0.99))  # margin off: the probability target


def test_features_flag_must_match_the_twin(fitted):
    with pytest.raises(PackError) as err:
        _pack(fitted, flat=0).validate()
    assert err.value.field == "tensors.twin_weight"


def test_refine_with_two_identical_classifiers_stays_finite(fitted):
    detector, _, _, _, unsafe = fitted
    twin = TorchTwin.from_detector(detector)
    x = torch.from_numpy(unsafe[:3])
    rows = torch.ones(2, 3, dtype=torch.bool)
    result = refine(x, [twin, twin], rows, etas=[1.0, 1.0], max_steps=20, target_logits=[-3.0, -5.0])
    assert torch.isfinite(result.embeds).all()
    assert (twin.logits(result.embeds) <= -3.0 + 1e-2).all()


@pytest.mark.parametrize("flat", [False, True])
def test_twin_gradient_shortcut_equals_autograd_of_the_features(flat):
    """refine() differentiates only the twin's non-linear features and adds the linear ones'
    constant gradient; logits and gradient must equal autograd through the feature function."""
    gen = torch.Generator().manual_seed(3)
    n, t, d, k = 3, 5, 8, 2
    width = 2 * d + 1 + (t * d if flat else 0)
    twin = TorchTwin(concept=torch.randn(k, d, generator=gen), weight=torch.randn(width, generator=gen),
                     bias=torch.randn(1, generator=gen), tau=0.2, flat=flat)
    x = torch.randn(n, t, d, generator=gen)
    with torch.enable_grad():
        logits, grad = twin.logits_for_grad(x)
        xr = x.clone().requires_grad_(True)
        reference = twin.logits(xr)
        (expected,) = torch.autograd.grad(reference.sum(), xr)
        got = grad()
    torch.testing.assert_close(logits, reference.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def anchored(fitted):
    """A second detector for an *anchor* (its own tokens at other positions) and its twin."""
    detector, _, concept, safe, unsafe = fitted
    rng = np.random.default_rng(7)
    anchor = rng.normal(size=(2, D)).astype(np.float32)
    with_anchor = safe[:40].copy()
    with_anchor[:, 8:10] += 2 * anchor
    anchor_detector = fit_detector(with_anchor, np.concatenate([unsafe[40:], safe[40:]]), anchor, C=0.1)
    return TorchTwin.from_detector(detector), TorchTwin.from_detector(anchor_detector), anchor_detector


def test_refine_without_anchors_is_bit_identical_to_the_plain_call(fitted, anchored):
    twin, anchor, _ = anchored
    x = torch.from_numpy(np.concatenate([fitted[4][:3], fitted[3][:2]]))
    rows = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    plain = refine(x, [twin], rows, etas=[1.0], max_steps=20, target_logits=[-4.0])
    for flags in (None, [False]):
        same = refine(x, [twin], rows, etas=[1.0], max_steps=20, target_logits=[-4.0], anchors=flags)
        assert torch.equal(same.embeds, plain.embeds) and same.steps == plain.steps
    two = torch.stack([rows[0], rows[0]])
    a = refine(x, [twin, anchor], two, etas=[1.0, 1.0], max_steps=20, target_logits=[-4.0, -4.0])
    b = refine(x, [twin, anchor], two, etas=[1.0, 1.0], max_steps=20, target_logits=[-4.0, -4.0],
               anchors=[False, False])
    assert torch.equal(a.embeds, b.embeds)


def test_anchor_rises_above_its_target_on_flagged_rows_only(fitted, anchored):
    twin, anchor, _ = anchored
    _, _, _, safe, unsafe = fitted
    x = torch.from_numpy(np.concatenate([unsafe[:4], safe[50:53]]))
    flagged = torch.tensor([1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    goal = float(anchor.logits(x).max()) + 2.0  # above every row: the anchor is active wherever it may be
    result = refine(x, [twin, anchor], torch.stack([flagged, flagged]), etas=[1.0, 1.0], max_steps=20,
                    target_logits=[-4.0, goal], anchors=[False, True])
    assert (twin.logits(result.embeds[:4]) <= -4.0 + 1e-2).all()  # still away from the concept
    assert (anchor.logits(result.embeds[:4]) >= goal - 1e-2).all()  # and onto the anchor
    assert (anchor.logits(x[:4]) < goal).all()
    assert torch.equal(result.embeds[4:], x[4:])  # unflagged rows bit-identical
    assert result.steps <= 10


def test_anchor_already_above_its_target_does_not_move_the_row(fitted, anchored):
    twin, anchor, _ = anchored
    x = torch.from_numpy(fitted[4][:3])
    rows = torch.ones(2, 3, dtype=torch.bool)
    low = float(anchor.logits(x).min()) - 5.0  # every row already above: the anchor stays inactive
    plain = refine(x, [twin, anchor], rows, etas=[1.0, 1.0], max_steps=20, target_logits=[-4.0, 1e4],
                   anchors=[False, False])  # an unreachable concept-style target would never be active
    with_anchor = refine(x, [twin, anchor], rows, etas=[1.0, 1.0], max_steps=20, target_logits=[-4.0, low],
                         anchors=[False, True])
    torch.testing.assert_close(with_anchor.embeds, plain.embeds)  # only the concept pushed, both times


def test_anchor_composes_with_several_concepts(fitted, anchored):
    _, _, concept, safe, unsafe = fitted
    twin, anchor, _ = anchored
    rng = np.random.default_rng(5)
    other = rng.normal(size=(2, D)).astype(np.float32)
    unsafe2 = safe.copy()
    unsafe2[:, 5:7] += 2 * other
    twin2 = TorchTwin.from_detector(fit_detector(unsafe2, safe, other, C=0.1))
    x = torch.from_numpy(np.concatenate([unsafe[:3], unsafe2[:3], safe[60:62]]))
    rows = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0],   # concept 1
                         [1, 0, 0, 1, 1, 1, 0, 0],   # concept 2 (row 0 erased for both)
                         [1, 1, 1, 0, 0, 0, 0, 0]],  # concept 1's anchor: concept 1's rows
                        dtype=torch.bool)
    goal = float(anchor.logits(x).max()) + 1.0
    result = refine(x, [twin, twin2, anchor], rows, etas=[1.0] * 3, max_steps=20,
                    target_logits=[-4.0, -4.0, goal], anchors=[False, False, True])
    for c, (tw, above) in enumerate([(twin, False), (twin2, False), (anchor, True)]):
        z = tw.logits(result.embeds)[rows[c]]
        assert ((z >= goal - 1e-2) if above else (z <= -4.0 + 1e-2)).all(), c
    assert torch.equal(result.embeds[6:], x[6:])


def _anchored_pack(fitted, anchored, **hp_over):
    pack = _pack(fitted, **{"anchor": 1, "anchor_target_logit": 3.0, "anchor_prompt": "plain", **hp_over})
    pack.tensors.update(cgce.pack_tensors_from_detector(anchored[2], prefix="anchor_"))
    return pack


def test_anchor_pack_round_trip_and_classifier(tmp_path, fitted, anchored):
    pack = _anchored_pack(fitted, anchored)
    clf = cgce.CGCEClassifier.from_pack(ConceptPack.from_pretrained(pack.save_pretrained(tmp_path / "a")))
    assert clf.anchor_twin is not None and clf.anchor_target_logit == 3.0
    assert torch.equal(clf.anchor_twin.weight, anchored[1].weight)
    off = cgce.CGCEClassifier.from_pack(_anchored_pack(fitted, anchored, anchor=0))
    assert off.anchor_twin is None  # tensors kept, anchor switched off
    assert cgce.CGCEClassifier.from_pack(_pack(fitted)).anchor_twin is None  # packs without an anchor


@pytest.mark.parametrize("edit, field", [
    (lambda p: p.tensors.pop("anchor_twin_bias"), "tensors.anchor_twin_bias"),
    (lambda p: p.tensors.update(anchor_twin_weight=torch.zeros(3)), "tensors.anchor_twin_weight"),
    (lambda p: p.tensors.update(anchor_concept_embedding=torch.zeros(2, D + 1)), "tensors.anchor_concept_embedding"),
    (lambda p: p.tensors["anchor_twin_weight"].__setitem__(0, float("nan")), "tensors.anchor_twin_weight"),
    (lambda p: p.hyperparameters.pop("anchor_target_logit"), "hyperparameters.anchor_target_logit"),
    (lambda p: p.hyperparameters.update(anchor=2), "hyperparameters.anchor"),
])
def test_bad_anchor_tensors_are_refused(fitted, anchored, edit, field):
    pack = _anchored_pack(fitted, anchored)
    pack.tensors = {k: v.clone() for k, v in pack.tensors.items()}
    edit(pack)
    with pytest.raises(PackError) as err:
        pack.validate()
    assert err.value.field == field and err.value.fix
    assert "--set anchor" not in err.value.fix  # calibration writes the anchor fields; --set cannot fix them


def test_anchor_on_without_tensors_is_refused(fitted):
    with pytest.raises(PackError) as err:
        _pack(fitted, anchor=1, anchor_target_logit=1.0).validate()
    assert err.value.field == "hyperparameters.anchor"


def test_bad_anchor_flag_fix_is_one_that_works(fitted, anchored):
    # calibration writes `anchor` itself (`--set anchor=...` is refused there as unknown): the fix
    # must point at the pack's hyperparameters or at the anchor options, not at --set
    pack = _anchored_pack(fitted, anchored, anchor="yes")
    with pytest.raises(PackError) as err:
        pack.validate()
    assert err.value.field == "hyperparameters.anchor" and "--set" not in err.value.fix
    assert "--anchor-prompts" in err.value.fix
