"""The tensor maths the diffusers guard applies to flagged rows (CGCE's unconditional row, IRECE's text cut)."""

from __future__ import annotations

import torch

from erasekit.classifiers.guidance import negative_unconditional, refined_unconditional
from erasekit.steering.irece import cut_image_tokens, cut_video_tokens, gate_margin


def test_negative_unconditional_means_the_flagged_concepts_and_keeps_other_rows():
    g = torch.Generator().manual_seed(0)
    uncond, a, b = torch.randn(3, 4, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    rows_a, rows_b = torch.tensor([True, True, False]), torch.tensor([True, False, False])
    out, replaced = negative_unconditional(uncond, [(a, rows_a), (b, rows_b)])
    assert replaced.tolist() == [True, True, False]
    torch.testing.assert_close(out[0], (a + b) / 2)
    assert torch.equal(out[1], a) and torch.equal(out[2], uncond[2])
    swapped, _ = negative_unconditional(uncond, [(b, rows_b), (a, rows_a)])
    torch.testing.assert_close(swapped, out)  # pack order does not matter


def test_refined_unconditional_moves_only_the_given_rows_by_what_refinement_removed():
    g = torch.Generator().manual_seed(1)
    uncond, before, after = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    out = refined_unconditional(uncond, before, after, torch.tensor([False, True]))
    assert torch.equal(out[0], uncond[0])
    torch.testing.assert_close(out[1], uncond[1] + before[1] - after[1])


def test_cut_image_tokens_copies_the_unconditional_output_under_the_pooled_mask():
    images, channels = 2, 3
    out = torch.arange(2 * images * 16 * channels, dtype=torch.float32).view(2 * images, 16, channels)
    mask = torch.zeros(images, 1, 8, 8, dtype=torch.bool)
    mask[1, 0, :2, :2] = True  # image 1, the top-left latent pixels: token (0, 0) of a 4x4 grid
    cut = cut_image_tokens(out, mask, images)
    assert torch.equal(cut[:images], out[:images]) and torch.equal(cut[images], out[images])
    assert torch.equal(cut[images + 1, 0], out[1, 0]) and torch.equal(cut[images + 1, 1:], out[images + 1, 1:])
    odd = torch.zeros(2 * images, 15, channels)  # no 2-D grid of the latent's shape has 15 tokens
    assert cut_image_tokens(odd, mask, images) is odd


def test_cut_video_tokens_pools_frames_by_the_temporal_patch():
    images = 1
    out = torch.randn(2 * images, 2 * 4, 3)  # 4 frames / patch_t 2 = 2 token frames of a 2x2 grid
    mask = torch.zeros(images, 4, 1, 4, 4, dtype=torch.bool)
    mask[0, 3, 0, 3, 3] = True  # last frame, bottom-right: token frame 1, token (1, 1)
    cut = cut_video_tokens(out, mask, images, patch_t=2)
    assert torch.equal(cut[1, 7], out[0, 7]) and torch.equal(cut[1, :7], out[1, :7])


def test_gate_margin_sums_layer_means_and_subtracts_the_threshold():
    maps = [torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.tensor([[2.0, 2.0], [4.0, -2.0]])]
    assert gate_margin(maps, torch.tensor(0.5), torch.tensor(4.0)).tolist() == [0.5, -2.5]
