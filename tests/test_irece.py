"""IRECE tensor maths: attention share, map upsampling, masks, perturbation outside the mask."""

from __future__ import annotations

import pytest
import torch

from erasekit.steering import irece


def test_attention_share_matches_explicit_softmax():
    torch.manual_seed(0)
    b, q, t, k, heads, d = 2, 5, 7, 3, 2, 4
    query, keys, ckeys = torch.randn(b, q, heads * d), torch.randn(b, t, heads * d), torch.randn(k, heads * d)
    share = irece.concept_attention_share(query, keys, ckeys, heads, d**-0.5)
    expected = torch.zeros(b, q)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        all_keys = torch.cat([keys[:, :, sl], ckeys[None, :, sl].expand(b, k, d)], dim=1)
        probs = torch.softmax(query[:, :, sl] @ all_keys.transpose(1, 2) * d**-0.5, dim=-1)
        expected += probs[:, :, t:].sum(-1) / heads
    torch.testing.assert_close(share, expected)
    assert ((share >= 0) & (share <= 1)).all()


def test_concept_key_equal_to_a_query_direction_dominates():
    heads, d = 1, 8
    query = torch.zeros(1, 2, d)
    query[0, 0, 0] = 10.0  # this pixel "looks like" the concept
    ckeys = torch.zeros(1, d)
    ckeys[0, 0] = 10.0
    share = irece.concept_attention_share(query, torch.zeros(1, 4, d), ckeys, heads, d**-0.5)
    assert share[0, 0] > 0.99 and share[0, 1] < 0.5


def test_maps_to_latent_and_mask():
    coarse = torch.zeros(1, 4)  # 2x2 map
    coarse[0, 0] = 1.0
    fine = torch.zeros(1, 16)  # 4x4 map
    fine[0, 0] = 1.0
    share = irece.maps_to_latent([coarse, fine], (4, 4))
    assert share.shape == (1, 4, 4)
    assert share[0, 0, 0] > share[0, 3, 3]
    mask = irece.build_mask(share, 0.5, dilate=0)
    assert mask.shape == (1, 1, 4, 4) and mask[0, 0, 0, 0] and not mask[0, 0, 3, 3]
    assert irece.build_mask(share, 0.5, dilate=1).sum() > mask.sum()
    with pytest.raises(ValueError, match="does not tile"):
        irece.maps_to_latent([torch.zeros(1, 5)], (4, 4))


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
