"""CastWeights: low-precision linear weights kept across autocast passes give autocast's own values,
follow edits to the weights, and leave every parameter as it was after the block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from erasekit.integrations.cast_weights import CastWeights


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 8, bias=False))


def _autocast(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x)


def test_swapped_pass_equals_plain_autocast_and_restores_the_parameters():
    model, x = _model(), torch.randn(4, 16)
    before = {name: p for name, p in model.named_parameters()}
    expected = _autocast(model, x)
    cast = CastWeights(torch.bfloat16)
    for _ in range(2):  # second pass: the copies made by the first
        with cast.swapped([model]):
            assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32  # LayerNorm left
            out = _autocast(model, x)
        assert torch.equal(out, expected)
    assert len(cast) == 3  # two weights, one bias
    assert all(p is before[name] for name, p in model.named_parameters())  # the very same parameters back


def test_copies_follow_in_place_edits_and_replaced_parameters():
    model, x = _model(), torch.randn(4, 16)
    cast = CastWeights(torch.bfloat16)
    with cast.swapped([model]):
        _autocast(model, x)
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # as LoRA fusing does
    expected = _autocast(model, x)  # outside the block: autocast casts the edited weight itself
    with cast.swapped([model]):
        assert torch.equal(_autocast(model, x), expected)
    model[3].weight = nn.Parameter(torch.randn(8, 32))
    expected = _autocast(model, x)
    with cast.swapped([model]):
        assert torch.equal(_autocast(model, x), expected)
    assert len(cast) == 3  # the replaced weight's copy was dropped


def test_parameters_restored_when_the_pass_raises():
    model = _model()
    weight = model[0].weight
    cast = CastWeights(torch.bfloat16)
    with pytest.raises(RuntimeError, match="boom"), cast.swapped([model]):
        raise RuntimeError("boom")
    assert model[0].weight is weight


def test_modules_under_accelerate_hooks_are_left_to_autocast():
    model = _model()
    model._hf_hook = object()  # accelerate's offload hooks move weights between devices
    cast = CastWeights(torch.bfloat16)
    with cast.swapped([model]):
        assert model[0].weight.dtype == torch.float32
    assert len(cast) == 0
