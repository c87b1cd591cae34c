"""KIF and MLLMEraser edits with folded constants: the same numbers as the straightforward
implementation they replaced (kept below as the reference), in far fewer tensor ops per call.

On a GPU each eager op is a kernel launch (~8-15 µs of host time), which at decode batch sizes is
most of an edit's cost; the op-count bounds below keep that from silently growing again.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.edit_ops import cases, count_ops
from erasekit.steering.kif import KIFEdit
from erasekit.steering.mllmeraser import MLLMEraserEdit
from erasekit.steering.residual import Phase, TokenLayout


# ------------------------------------------------------------------ reference (the old code)
class _RefKIF:
    """KIFEdit.gate/edit as they were before the constants were folded (verbatim)."""

    def __init__(self, layers, t, hp):
        self.t, self.hp = t, hp
        self._slot = {layer: i for i, layer in enumerate(layers)}
        self.phases = frozenset(Phase(p) for p in hp.get("phases", ["prefill", "decode"]))

    def gate(self, layer, hidden, layout):
        i = self._slot[layer]
        z = (hidden.float() - self.t["mean"][i]) / self.t["scale"][i]
        proj = z @ self.t["signature_z"][i]  # [N]
        seq = layout.seq_index
        valid = seq >= 0
        idx = seq.clamp_min(0)
        total = torch.zeros(layout.num_seqs, dtype=proj.dtype, device=proj.device).index_add_(
            0, idx, torch.where(valid, proj, torch.zeros_like(proj)))
        count = torch.zeros_like(total).index_add_(0, idx, valid.to(proj.dtype)).clamp_min(1.0)
        zstat = (total / count - self.t["gate_mu"][i]) / self.t["gate_sigma"][i]
        return torch.sigmoid(self.hp["gate_k"] * (zstat - self.hp["gate_tau"]))

    def edit(self, layer, hidden, layout, rows, phase):
        if phase not in self.phases:
            return hidden
        i = self._slot[layer]
        g = self.gate(layer, hidden, layout)[layout.seq_index.clamp_min(0)]  # [N]
        h = hidden.float()
        dirs = self.t["directions"][i]  # [k, d]
        base = h - self.t["mean"][i] if self.hp.get("center") else h
        removed = (base @ dirs.T) @ dirs  # [N, d]
        delta = -(g * self.hp["suppression"]).unsqueeze(-1) * removed
        refusal = self.hp.get("refusal_strength", 0.0)
        if refusal:
            if self.hp.get("refusal_units") == "residual_norm":
                refusal = refusal * self.t["residual_norm"][i]
            delta = delta + (g * refusal).unsqueeze(-1) * self.t["refusal"][i]
        return torch.where(rows.unsqueeze(-1), (h + delta).to(hidden.dtype), hidden)


class _RefMLLM:
    """MLLMEraserEdit.edit as it was before (verbatim)."""

    def __init__(self, layers, direction, readout, strength):
        self.direction, self.readout, self.strength = direction, readout, float(strength)
        self._slot = {layer: i for i, layer in enumerate(layers)}

    def steering_vectors(self, layer, h_last):
        i = self._slot[layer]
        coeff = h_last.float() @ self.readout[i]  # [B]
        return self.strength * coeff.unsqueeze(-1) * self.direction[i]

    def edit(self, layer, hidden, layout, rows, phase):
        if phase is not Phase.PREFILL:
            return hidden
        steer = self.steering_vectors(layer, hidden[layout.last_index])  # [B, d]
        delta = steer[layout.seq_index.clamp_min(0)]
        return torch.where(rows.unsqueeze(-1), hidden + delta.to(hidden.dtype), hidden)


# ------------------------------------------------------------------ worlds
D = 96


def _states(g: torch.Generator, n: int) -> torch.Tensor:
    """Residual-stream-like rows: per-dimension offsets with a few massive outlier dimensions (the
    case where folding ``(h - mean) / scale`` into ``h @ w - c`` could lose float32 precision)."""
    fixed = torch.Generator().manual_seed(1234)  # the same stream statistics for every call
    offset = torch.randn(D, generator=fixed) * 3.0
    offset[[3, 40, 77]] = torch.tensor([120.0, -80.0, 60.0])
    spread = torch.rand(D, generator=fixed) * 2.0 + 0.2
    return offset + spread * torch.randn(n, D, generator=g)


def _kif_tensors(g: torch.Generator) -> dict[str, torch.Tensor]:
    sample = _states(torch.Generator().manual_seed(99), 64)
    mean, scale = sample.mean(0), sample.std(0)
    sig = torch.nn.functional.normalize(torch.randn(2, D, generator=g), dim=-1)
    zproj = ((sample - mean) / scale) @ sig.T  # [64, 2]: calibrate the gate so it is half open
    dirs = torch.linalg.qr(torch.randn(D, 3, generator=g))[0].T
    return {"mean": torch.stack([mean, mean * 0.9]), "scale": torch.stack([scale, scale * 1.1]),
            "signature_z": sig, "directions": torch.stack([dirs, dirs.flip(0)]),
            "gate_mu": zproj.mean(0), "gate_sigma": zproj.std(0),
            "refusal": torch.nn.functional.normalize(torch.randn(2, D, generator=g), dim=-1),
            "residual_norm": torch.tensor([30.0, 45.0])}


HP_VARIANTS = {
    "plain": {"suppression": 0.8, "gate_k": 1.6, "gate_tau": 0.0},
    "center_refusal": {"suppression": 1.0, "gate_k": 2.0, "gate_tau": 0.5, "center": True, "refusal_strength": 3.0},
    "refusal_residual_norm": {"suppression": 0.5, "gate_k": 1.0, "gate_tau": -0.5, "refusal_strength": 0.2,
                              "refusal_units": "residual_norm"},
}


def _layouts() -> dict[str, tuple[TokenLayout, Phase]]:
    """vLLM prefill chunk and decode, a mixed chunk, and transformers' padded prefill and decode."""
    return {
        "vllm_prefill": (TokenLayout.from_query_start_loc(torch.tensor([0, 5, 6, 13])), Phase.PREFILL),
        "vllm_decode": (TokenLayout.from_query_start_loc(torch.arange(7)), Phase.DECODE),
        "vllm_mixed": (TokenLayout.from_query_start_loc(torch.tensor([0, 1, 4, 5, 6, 9])), Phase.DECODE),
        "hf_padded_prefill": (TokenLayout.from_attention_mask(
            torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])), Phase.PREFILL),
        "hf_decode": (TokenLayout.from_attention_mask(torch.ones(4, 1, dtype=torch.long)), Phase.DECODE),
        # a padding row in a one-row-per-sequence layout (an empty prompt): never active
        "hf_padded_single": (TokenLayout.from_attention_mask(torch.tensor([[1], [0], [1]])), Phase.PREFILL),
    }


def _rows(layout: TokenLayout, seed: int) -> torch.Tensor:
    active = torch.rand(layout.num_seqs, generator=torch.Generator().manual_seed(seed)) < 0.7
    active[0] = True
    return layout.rows_for(active)


def _check(new: torch.Tensor, ref: torch.Tensor, hidden: torch.Tensor, rows: torch.Tensor,
           bf16_differ: float = 0.01) -> None:
    assert new.dtype == ref.dtype == hidden.dtype and new.shape == ref.shape
    assert torch.equal(new[~rows], hidden[~rows])  # inactive and padding rows bit-identical
    if hidden.dtype == torch.float32:
        # 1e-5 of the row's magnitude (the outlier dimensions dominate it, as in real streams)
        scale = ref.abs().amax(-1, keepdim=True)
        err = ((new - ref).abs() / scale).max().item()
        assert err <= 1e-5, err
    else:
        # bf16: both round a float32 result to bf16, which agrees unless it sits near a rounding
        # boundary. The old MLLMEraser rounded the delta to bf16 before adding it (two roundings),
        # the new one rounds once. Allowed: one bf16 ulp (2^-7 relative, upper bound) of the result
        # or of the delta, on at most ``bf16_differ`` of the elements.
        diff = (new.float() - ref.float()).abs()
        ulp = (ref.float().abs() + (ref.float() - hidden.float()).abs()) * 2.0**-7
        assert bool((diff <= ulp).all()), (diff / ulp).max()
        assert (diff > 0).float().mean().item() <= bf16_differ, (diff > 0).float().mean()


@pytest.mark.parametrize("variant", sorted(HP_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kif_matches_the_unfolded_reference(variant: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    t = _kif_tensors(g)
    hp = HP_VARIANTS[variant]
    edit, ref = KIFEdit("c", (4, 9), t, hp), _RefKIF((4, 9), t, hp)
    gates = []
    for seed, (name, (layout, phase)) in enumerate(_layouts().items()):
        hidden = _states(g, layout.seq_index.shape[0]).to(dtype)
        rows = _rows(layout, seed)
        for layer in (4, 9):
            _check(edit.edit(layer, hidden, layout, rows, phase), ref.edit(layer, hidden, layout, rows, phase),
                   hidden, rows)
            torch.testing.assert_close(edit.gate(layer, hidden, layout), ref.gate(layer, hidden, layout),
                                       rtol=1e-5, atol=1e-6, msg=name)
            gates.append(ref.gate(layer, hidden, layout))
    every = torch.cat(gates)  # the world exercises the gate's slope, not just its saturated ends
    assert ((every > 0.05) & (every < 0.95)).float().mean() > 0.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mllmeraser_matches_the_unfolded_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(2, D, generator=g)
    readout = torch.randn(2, D, generator=g) / 400.0  # |h · u| ~ 1, as the ridge fit makes it
    edit, ref = MLLMEraserEdit("m", (1, 2), direction, readout, -0.3), _RefMLLM((1, 2), direction, readout, -0.3)
    for seed, (layout, phase) in enumerate(_layouts().values()):
        hidden = _states(g, layout.seq_index.shape[0]).to(dtype)
        rows = _rows(layout, seed)
        for layer in (1, 2):
            for p in (phase, Phase.PREFILL):
                _check(edit.edit(layer, hidden, layout, rows, p), ref.edit(layer, hidden, layout, rows, p),
                       hidden, rows, bf16_differ=0.1)  # the old double rounding: 4 % measured
        torch.testing.assert_close(edit.steering_vectors(2, hidden[layout.last_index]),
                                   ref.steering_vectors(2, hidden[layout.last_index]), rtol=1e-5, atol=1e-5)


def test_rows_none_edits_every_row_and_to_moves_the_folded_constants_unchanged() -> None:
    g = torch.Generator().manual_seed(2)
    t = _kif_tensors(g)
    edits = [KIFEdit("c", (4, 9), t, HP_VARIANTS["center_refusal"]),
             MLLMEraserEdit("m", (4, 9), torch.randn(2, D, generator=g), torch.randn(2, D, generator=g) / 400, -0.3)]
    layout, _ = _layouts()["vllm_prefill"]
    hidden = _states(g, 13)
    every = torch.ones(13, dtype=torch.bool)
    for edit in edits:
        moved = edit.to("cpu", torch.bfloat16)
        assert torch.equal(edit.edit(9, hidden, layout, None, Phase.PREFILL),
                           moved.edit(9, hidden, layout, every, Phase.PREFILL))


# ------------------------------------------------------------------ op counts
#: Upper bounds on the ops an edit() call computes (``compute``: top-level, not views nor no-op
#: casts; on a GPU about its kernel launches) and records in all (``all``: nested ones included).
#: Before folding: KIF 32 compute / 104 all (float32), 35 / 113 (bfloat16), whatever the layout;
#: MLLMEraser 8 / 33 and 10 / 39.
OP_BOUNDS = {
    "kif/decode/float32": (5, 22), "kif/decode/bfloat16": (7, 30),
    "kif/prefill/float32": (10, 35), "kif/prefill/bfloat16": (12, 43),
    "kif/padded_prefill/float32": (10, 35), "kif/padded_prefill/bfloat16": (12, 43),
    "mllmeraser/prefill/float32": (4, 13), "mllmeraser/prefill/bfloat16": (6, 21),
    "mllmeraser/padded_prefill/float32": (4, 13), "mllmeraser/padded_prefill/bfloat16": (6, 21),
}

#: ops that wait for the device (a host-device sync on a GPU): never in an edit
SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
            "aten::unique", "aten::_unique2", "aten::bincount"}


def test_edit_op_counts_stay_bounded_and_never_sync() -> None:
    calls = cases()
    assert set(calls) == set(OP_BOUNDS)
    for name, fn in calls.items():
        row = count_ops(fn)
        compute, every = OP_BOUNDS[name]
        assert row["compute"] <= compute and row["all"] <= every, (name, row)
        assert not row["names"] & SYNC_OPS, (name, row["names"] & SYNC_OPS)
