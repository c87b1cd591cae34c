"""Exact-tensor tests of the MLLMEraser and KIF edits (pure tensor math, no model)."""

from __future__ import annotations

import pytest
import torch

from erasekit.steering.kif import KIFEdit, cohens_d, mine_signatures, refusal_direction
from erasekit.steering.mllmeraser import MLLMEraserEdit, fit_mllmeraser
from erasekit.steering.residual import Phase, TokenLayout


def _world(seed: int = 0, layers: int = 2, d: int = 24):
    g = torch.Generator().manual_seed(seed)
    retain = torch.randn(layers, 40, d, generator=g)
    retain[..., :6] = 0.0  # retain activations never use the first 6 dimensions
    forget = torch.randn(layers, 30, d, generator=g)
    forget[..., :6] += 4.0
    return forget, retain


def test_mllmeraser_low_rank_factors_equal_the_dense_reference_map():
    """Golden test against the reference formula Δ̃ = (XᵀX + γPᵀP)⁺ Xᵀ(1 rᵀ), W = P Δ̃."""
    forget, retain = _world()
    recall, erasure = forget[:, :16], forget[:, :16] - 1.0
    t = fit_mllmeraser(recall, erasure, forget, retain, null_ratio=0.3, ridge_gamma=0.1)
    for layer in range(forget.shape[0]):
        q = t["null_basis"][layer].double()
        p = q @ q.T
        x = forget[layer].double() @ p
        r = t["direction"][layer].double()
        ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
        delta = torch.linalg.pinv(x.T @ x + 0.1 * p.T @ p) @ x.T @ ones @ r[None]
        dense = p @ delta
        low_rank = (q @ t["ridge_coef"][layer].double())[:, None] * r[None]
        torch.testing.assert_close(low_rank, dense, atol=1e-6, rtol=1e-5)


def test_mllmeraser_is_input_aware_retain_inputs_get_no_steering():
    forget, retain = _world()
    t = fit_mllmeraser(forget[:, :16], forget[:, :16] - 1.0, forget, retain, null_ratio=0.25)
    readout = (t["null_basis"] @ t["ridge_coef"].unsqueeze(-1)).squeeze(-1)
    edit = MLLMEraserEdit("c", (3, 7), t["direction"], readout, strength=-0.3)
    on_forget = edit.steering_vectors(3, forget[0]).norm(dim=-1)
    on_retain = edit.steering_vectors(3, retain[0]).norm(dim=-1)
    assert on_retain.max() < 1e-4 * on_forget.mean()
    # the ridge fit makes h_f · u ≈ 1, so forget inputs get ≈ λ r
    assert (forget[0] @ readout[0]).mean().item() == pytest.approx(1.0, abs=0.1)


def test_mllmeraser_edit_broadcasts_last_token_over_its_sequence_and_skips_decode():
    d = 8
    direction = torch.zeros(1, d)
    direction[0, 0] = 1.0
    readout = torch.zeros(1, d)
    readout[0, 1] = 1.0
    edit = MLLMEraserEdit("c", (0,), direction, readout, strength=-2.0)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])  # left padding in row 0
    layout = TokenLayout.from_attention_mask(mask)
    hidden = torch.randn(6, d)
    rows = layout.rows_for(torch.tensor([True, False]))
    out = edit.edit(0, hidden, layout, rows, Phase.PREFILL)
    coeff = hidden[2, 1]  # row 0's last token
    expected = hidden.clone()
    expected[1:3, 0] += -2.0 * coeff
    assert torch.equal(out[3:], hidden[3:])  # the inactive sequence is bit-identical
    assert torch.equal(out[0], hidden[0])  # padding is never edited
    torch.testing.assert_close(out, expected)
    assert edit.edit(0, hidden, layout, rows, Phase.DECODE) is hidden


def test_kif_signatures_find_the_planted_direction_and_rank_layers():
    g = torch.Generator().manual_seed(1)
    d = 16
    control = torch.randn(3, 50, d, generator=g)
    subject = torch.randn(3, 50, d, generator=g)
    subject[1, :, 2] += 6.0  # layer 1 carries a strong signature on dim 2
    subject[2, :, 2] += 1.0
    sig = mine_signatures(subject, control, top_k_directions=3, significance=2.0)
    assert int(sig["effect_size"].argmax()) == 1
    primary = sig["directions"][1, 0]
    assert primary[2] > 0.95  # points toward the subject
    dirs = sig["directions"][1]
    used = dirs[dirs.norm(dim=-1) > 0]
    torch.testing.assert_close(used @ used.T, torch.eye(used.shape[0]), atol=1e-5, rtol=0)
    assert cohens_d(torch.tensor([[3.0, 4.0, 5.0]]), torch.tensor([[0.0, 1.0, 2.0]])).item() == pytest.approx(3.0)


def _kif_edit(d: int = 8, gate_tau: float = -100.0, suppression: float = 1.0, refusal: float = 0.0) -> KIFEdit:
    direction = torch.zeros(1, 2, d)
    direction[0, 0, 0] = 1.0
    refusal_vec = torch.zeros(1, d)
    refusal_vec[0, 5] = 1.0
    tensors = {"mean": torch.zeros(1, d), "scale": torch.ones(1, d), "signature_z": direction[:, 0].clone(),
               "directions": direction, "gate_mu": torch.zeros(1), "gate_sigma": torch.ones(1), "refusal": refusal_vec,
               "residual_norm": torch.full((1,), 10.0)}
    hp = {"suppression": suppression, "gate_k": 1.6, "gate_tau": gate_tau, "refusal_strength": refusal}
    return KIFEdit("c", (2,), tensors, hp)


def test_kif_full_gate_removes_the_signature_projection_on_active_rows_only():
    edit = _kif_edit()
    layout = TokenLayout.from_attention_mask(torch.ones(2, 3, dtype=torch.long))
    hidden = torch.randn(6, 8) + 3.0
    rows = layout.rows_for(torch.tensor([True, False]))
    out = edit.edit(2, hidden, layout, rows, Phase.DECODE)
    assert torch.equal(out[3:], hidden[3:])
    torch.testing.assert_close(out[:3, 0], torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:3, 1:], hidden[:3, 1:])


def test_kif_gate_stays_shut_for_states_near_the_control_mean():
    edit = _kif_edit(gate_tau=3.0)
    layout = TokenLayout.from_attention_mask(torch.ones(2, 4, dtype=torch.long))
    hidden = torch.zeros(8, 8)
    hidden[4:, 0] = 8.0  # sequence 1 projects 8σ above the control mean
    g = edit.gate(2, hidden, layout)
    assert g[0] < 0.01 and g[1] > 0.99


def test_kif_refusal_steering_scales_with_residual_norm_units():
    layout = TokenLayout.from_attention_mask(torch.ones(1, 2, dtype=torch.long))
    hidden = torch.zeros(2, 8)
    rows = torch.ones(2, dtype=torch.bool)
    edit = _kif_edit(refusal=0.5)
    assert torch.allclose(edit.edit(2, hidden, layout, rows, Phase.PREFILL)[:, 5], torch.full((2,), 0.5))
    with pytest.raises(TypeError):  # hyperparameters are folded into the edit when it is built
        edit.hp["refusal_units"] = "residual_norm"
    edit = KIFEdit(edit.concept, edit.layers, edit.t, {**edit.hp, "refusal_units": "residual_norm"})
    assert torch.allclose(edit.edit(2, hidden, layout, rows, Phase.PREFILL)[:, 5], torch.full((2,), 5.0))


def test_refusal_direction_is_orthogonal_to_signatures():
    g = torch.Generator().manual_seed(2)
    dirs = torch.linalg.qr(torch.randn(8, 2, generator=g))[0].T.unsqueeze(0)
    r = refusal_direction(torch.randn(1, 10, 8, generator=g) + 1, torch.randn(1, 10, 8, generator=g), dirs)
    assert (dirs[0] @ r[0]).abs().max() < 1e-5
    assert r[0].norm().item() == pytest.approx(1.0, abs=1e-5)
