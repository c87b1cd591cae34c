"""IRECE tensor maths: attention share, map upsampling, masks, perturbation outside the mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from erasekit.steering import irece


def test_fit_probe_and_logits_localise_a_direction():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=8).astype(np.float32)
    pos = rng.normal(size=(200, 8)).astype(np.float32) + direction
    neg = rng.normal(size=(200, 8)).astype(np.float32) - direction
    weight, bias = irece.fit_probe(np.r_[pos, neg], np.r_[np.ones(200), np.zeros(200)])
    query = torch.zeros(1, 3, 8)
    query[0, 0] = torch.from_numpy(2 * direction)  # a position that looks like the concept
    query[0, 2] = torch.from_numpy(-2 * direction)
    logits = irece.probe_logits(query, weight, bias)
    assert logits.shape == (1, 3)
    assert logits[0, 0] > 2 and logits[0, 2] < -2
    # fitted on means, applied per position: the mean position logit is the image logit
    torch.testing.assert_close(logits.mean(), irece.probe_logits(query.mean(1, True), weight, bias)[0, 0])


def test_maps_to_latent_and_mask():
    coarse = torch.zeros(1, 4)  # 2x2 map
    coarse[0, 0] = 1.0
    fine = torch.zeros(1, 16)  # 4x4 map
    fine[0, 0] = 1.0
    logits = irece.maps_to_latent([coarse, fine], (4, 4))
    assert logits.shape == (1, 4, 4)
    assert logits[0, 0, 0] > logits[0, 3, 3]
    with pytest.raises(ValueError, match="does not tile"):
        irece.maps_to_latent([torch.zeros(1, 5)], (4, 4))
    hot = torch.full((2, 4, 4), -1.0)
    hot[0] = 3.0  # image 0 is confidently the concept ...
    hot[0, :2] = 5.0  # ... most of all in its top half
    latched = torch.tensor([True, False])
    mask = irece.build_mask(hot, latched, dilate=0)
    assert mask.shape == (2, 1, 4, 4)
    assert mask[0, 0, :2].all() and not mask[0, 0, 2:].any() and not mask[1].any()  # only latched images
    dilated = irece.build_mask(hot, latched, dilate=1)
    assert dilated.sum() > mask.sum() and not dilated[1].any()
    whole = irece.build_mask(hot, latched, dilate=0, mode="image")
    assert whole[0].all() and not whole[1].any()


def test_step_probes_and_gate_thresholds_hold_the_false_positive_rate():
    rng = np.random.default_rng(1)
    direction = rng.normal(size=(3, 6))  # a different concept direction per step
    pos = rng.normal(size=(100, 3, 6)) + direction
    neg = rng.normal(size=(100, 3, 6)) - direction
    weight, bias = irece.fit_step_probes(np.r_[pos, neg], np.r_[np.ones(100), np.zeros(100)])
    assert weight.shape == (3, 6) and bias.shape == (3,)
    assert all(np.corrcoef(weight[t], direction[t])[0, 1] > 0.9 for t in range(3))
    held = rng.normal(size=(400, 3, 6)) - direction
    logits = np.einsum("nsf,sf->ns", held, weight) + bias
    thr = irece.gate_thresholds(logits, 0.05, 0, 3)
    fired = (logits > thr).any(1)
    assert fired.mean() <= 0.05 + 1e-9 and fired.mean() > 0  # the quantile, over the whole window
    strict = irece.gate_thresholds(logits, 0.0, 0, 3)  # fpr * N < 1: above every held-out negative
    assert not (logits > strict).any()
    fresh = np.einsum("nsf,sf->ns", rng.normal(size=(400, 3, 6)) + direction, weight) + bias
    assert (fresh > thr).any(1).mean() > 0.9  # and the concept still fires
    assert [irece.calibration_step(s, 10, 20) for s in (0, 9)] == [0, 19]
    assert irece.calibration_step(0, 1, 20) == 0


def test_perturb_changes_only_masked_latents():
    latents = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[0, :, :4] = True
    out = irece.perturb_latents(latents, mask, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(out[1], latents[1])
    assert torch.equal(out[0, :, 4:], latents[0, :, 4:])
    assert not torch.equal(out[0, :, :4], latents[0, :, :4])
    again = irece.perturb_latents(latents, mask, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded: reproducible


def test_window():
    assert [s for s in range(10) if irece.in_window(s, 10, 0.2, 0.5)] == [2, 3, 4]
    assert [s for s in range(2) if irece.in_window(s, 2, 0.0, 0.5)] == [0]
