"""KIF activation-signature suppression, the training-free runtime part (arXiv 2601.10566).

Signature mining (module C of the reference code), per candidate layer, on mean-pooled
decoder-layer outputs — the tensor the hook edits:

* z-score the activations with a scaler fitted on subject ∪ control prompts;
* primary direction ``d₀ = normalize(mean z(subject) − mean z(control))``, effect size =
  Cohen's d of the projections;
* up to ``top_k_directions − 1`` extra directions: principal components of the subject
  residual after removing ``d₀``, kept only if their own Cohen's d ≥ ``significance``;
* best layer(s) = largest effect size.

Runtime (module E, "Hyper-Sentinel"): the router (see :mod:`erasekit.steering.router`) decides
which rows the concept is active for; the gate ``g = sigmoid(k (z − τ))`` reads the standardized
projection of the chunk's mean z-scored state on ``d₀`` (``μ_s, σ_s`` calibrated on control
prompts with the very same statistic — the reference calibrates on the last layer but applies
elsewhere; that mismatch is not copied); suppression
``h ← h − g |s| Σ_i ((h − c)·d_i) d_i`` over the orthonormalised signatures mapped back to the
residual stream (``c`` = 0 as in the paper, or the scaler mean with ``center=True``);
optionally ``h ← h + g · refusal_strength · r̂`` with ``r̂`` orthogonal to the signatures.

The paper's FQ/MU numbers need its LoRA stage, which erasekit does not do: the runtime part is
measured on its own in ``benchmarks/llm_unlearning``. Pure tensor math: no framework imports.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

from erasekit.errors import PackError
from erasekit.guardrails.methods import MethodSpec, register_method
from erasekit.steering.residual import Phase, ResidualEdit, TokenLayout, register_edit_factory
from erasekit.steering.router import validate_router

METHOD = "kif"

DEFAULT_HYPERPARAMETERS: dict[str, Any] = {
    "suppression": 0.8,          # |s|
    "gate_k": 1.6,               # k
    "gate_tau": 3.0,             # τ
    "top_k_directions": 3,
    "significance": 2.0,         # Cohen's d needed to keep an extra PCA direction
    "num_layers": 1,             # apply at the best layer (paper) or the top-n layers
    "candidate_layers": None,    # None: every decoder layer
    "center": False,
    "refusal_strength": 0.0,     # 0 = suppression only
    "refusal_units": "absolute",  # or "residual_norm": strength × the layer's mean residual norm
    "refusal_prompts": 32,       # generic prompts for the refusal direction (the reference uses 32)
    "phases": ["prefill", "decode"],
}


def cohens_d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cohen's d of ``a`` vs ``b`` along the last-but-one axis (pooled standard deviation)."""
    na, nb = a.shape[-1], b.shape[-1]
    va = a.var(-1, unbiased=True) if na > 1 else torch.zeros_like(a[..., 0])
    vb = b.var(-1, unbiased=True) if nb > 1 else torch.zeros_like(b[..., 0])
    pooled = (((na - 1) * va + (nb - 1) * vb) / max(na + nb - 2, 1)).clamp_min(1e-12).sqrt()
    return (a.mean(-1) - b.mean(-1)) / pooled


def mine_signatures(
    subject: torch.Tensor,
    control: torch.Tensor,
    *,
    top_k_directions: int = 3,
    significance: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Signature directions for every layer of ``[L, N, d]`` mean-pooled activations.

    Returns per layer: ``mean``/``scale`` (the z-scaler), ``signature_z`` (``d₀`` in z space),
    ``directions`` ``[L, k, d]`` (orthonormal, residual-stream space, zero rows = unused),
    ``effect_size`` ``[L]`` (Cohen's d of ``d₀``) and ``gate_mu``/``gate_sigma`` (the gate's
    statistic on the control prompts).
    """
    if subject.dim() != 3 or control.dim() != 3 or subject.shape[1] < 2 or control.shape[1] < 2:
        raise ValueError("subject and control must be [layers, n>=2, d] tensors")
    work = torch.float64
    pos, neg = subject.to(work), control.to(work)
    both = torch.cat([pos, neg], 1)
    mean = both.mean(1)
    scale = both.std(1).clamp_min(1e-6)
    zpos = (pos - mean[:, None]) / scale[:, None]
    zneg = (neg - mean[:, None]) / scale[:, None]
    d0 = zpos.mean(1) - zneg.mean(1)
    d0 = d0 / d0.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    ppos = (zpos @ d0.unsqueeze(-1)).squeeze(-1)  # [L, Np]
    pneg = (zneg @ d0.unsqueeze(-1)).squeeze(-1)
    effect = cohens_d(ppos, pneg)
    n_layers, _, dim = pos.shape
    k = max(1, int(top_k_directions))
    directions = torch.zeros(n_layers, k, dim, dtype=work)
    for layer in range(n_layers):  # calibration only: a handful of layers, one SVD each
        zs = [d0[layer]]
        if k > 1:
            resid = zpos[layer] - ppos[layer, :, None] * d0[layer]
            resid = resid - resid.mean(0)
            _, _, vh = torch.linalg.svd(resid, full_matrices=False)
            for comp in vh[: 4 * k]:
                cp, cn = zpos[layer] @ comp, zneg[layer] @ comp
                eff = float(cohens_d(cp, cn))
                if abs(eff) >= significance:
                    zs.append(comp if eff > 0 else -comp)  # point toward the subject
                if len(zs) == k:
                    break
        # A z-space direction is the displacement scale ⊙ d_z in the residual stream.
        raw = torch.stack(zs) * scale[layer]
        q, r = torch.linalg.qr(raw.T)
        sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(work)  # keep each one's orientation
        directions[layer, : len(zs)] = (q * sign).T
    gate_stat = pneg  # the control prompts' pooled projection on d₀
    return {
        "mean": mean.float(),
        "scale": scale.float(),
        "signature_z": d0.float(),
        "directions": directions.float(),
        "effect_size": effect.float(),
        "gate_mu": gate_stat.mean(-1).float(),
        "gate_sigma": gate_stat.std(-1).clamp_min(1e-6).float(),
        "subject_projection": ppos.mean(-1).float(),
    }


def refusal_direction(refuse: torch.Tensor, helpful: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Unit ``mean(refuse) − mean(helpful)`` per layer, orthogonalised to the signatures.

    ``refuse``/``helpful`` are ``[L, N, d]`` last-token states, ``directions`` ``[L, k, d]``.
    """
    r = refuse.double().mean(1) - helpful.double().mean(1)
    dirs = directions.double()
    r = r - ((dirs @ r.unsqueeze(-1)) * dirs).sum(1)
    return (r / r.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()


class _Folded(NamedTuple):
    """One layer's constants of :meth:`KIFEdit.edit`, folded once when the edit is built.

    ``h @ proj + bias`` gives, per row, the gate's pre-pooling statistic and the projections on
    the signatures: column 0 is ``(k/σ_s) · (z(h) · d₀)`` (the z-scoring and the gate's slope
    folded into one vector, so ``bias[0] = −(k/σ_s) · (mean/scale) · d₀``), columns ``1..k`` are
    ``(h − c) · d_i`` (``bias[1:] = −c · d_i``). A sequence's gate is then
    ``sigmoid(mean over its rows of column 0 + gate_shift)`` with
    ``gate_shift = −k μ_s/σ_s − k τ``; ``bias_row`` adds ``gate_shift`` to column 0 already, for
    layouts with one row per sequence (no pooling). The edit is ``h + [g, g (h − c) · d] @ out``
    with ``out = [refusal vector; −|s| d_1; ...; −|s| d_k]`` (a zero first row without refusal).
    """

    proj: torch.Tensor        # [d, 1 + k]
    bias: torch.Tensor        # [1 + k]
    bias_row: torch.Tensor    # [1 + k]
    gate_shift: torch.Tensor  # [1]
    out: torch.Tensor         # [1 + k, d]


class KIFEdit(ResidualEdit):
    """Gated projection suppression of the concept's activation signature.

    Every constant of the edit is folded per layer when the edit is built (see :class:`_Folded`),
    so ``hyperparameters`` are read then and kept read-only: build a new edit to change them.
    A call is then a handful of tensor ops (on a GPU, kernel launches), with no host-device sync.
    """

    def __init__(self, concept: str, layers: tuple[int, ...], tensors: dict[str, torch.Tensor],
                 hyperparameters: dict[str, Any]):
        self.concept = concept
        self.layers = tuple(int(x) for x in layers)
        self.t = tensors
        self.hp: Mapping[str, Any] = MappingProxyType(dict(hyperparameters))
        self.phases = frozenset(Phase(p) for p in self.hp.get("phases", ["prefill", "decode"]))
        self._slot = {layer: i for i, layer in enumerate(self.layers)}
        self._folded = self._fold()

    @classmethod
    def from_pack(cls, pack: Any) -> KIFEdit:
        t = {k: v.float() for k, v in pack.tensors.items() if k in _RUNTIME_TENSORS}
        return cls(pack.name, tuple(pack.tensors["layers"].tolist()), t, pack.hyperparameters)

    def _fold(self) -> list[_Folded]:
        """Per layer slot, the folded constants (computed in float64, stored in float32)."""
        t, hp, work = self.t, self.hp, torch.float64
        mean, scale, sig = t["mean"].to(work), t["scale"].to(work), t["signature_z"].to(work)
        dirs = t["directions"].to(work)  # [n, k, d]
        k_gate, tau = float(hp["gate_k"]), float(hp["gate_tau"])
        slope = k_gate / t["gate_sigma"].to(work)  # [n]
        w_gate = sig / scale * slope[:, None]  # [n, d]
        gate_bias = -(mean / scale * sig).sum(-1) * slope  # [n]
        gate_shift = -slope * t["gate_mu"].to(work) - k_gate * tau  # [n]
        if hp.get("center"):
            dir_bias = -(dirs * mean[:, None, :]).sum(-1)  # [n, k]
        else:
            dir_bias = torch.zeros(dirs.shape[:2], dtype=work, device=dirs.device)
        refusal = float(hp.get("refusal_strength", 0.0))
        if refusal:
            strength = refusal * (t["residual_norm"].to(work) if hp.get("refusal_units") == "residual_norm"
                                  else torch.ones_like(slope))
            refusal_vec = strength[:, None] * t["refusal"].to(work)  # [n, d]
        else:
            refusal_vec = torch.zeros_like(mean)
        out = torch.cat([refusal_vec[:, None, :], -float(hp["suppression"]) * dirs], dim=1)  # [n, 1 + k, d]
        proj = torch.cat([w_gate[:, :, None], dirs.transpose(1, 2)], dim=2)  # [n, d, 1 + k]
        bias = torch.cat([gate_bias[:, None], dir_bias], dim=1)  # [n, 1 + k]
        bias_row = bias.clone()
        bias_row[:, 0] += gate_shift
        f32 = torch.float32
        return [_Folded(proj[i].to(f32).contiguous(), bias[i].to(f32), bias_row[i].to(f32),
                        gate_shift[i : i + 1].to(f32), out[i].to(f32).contiguous()) for i in range(len(self.layers))]

    def _project(self, f: _Folded, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """``[N, 1 + k]``: column 0 each row's gate ``g``, columns ``1..k`` ``g (h − c) · d_i``."""
        h = hidden if hidden.dtype == torch.float32 else hidden.float()
        if layout.one_row_per_seq:  # decode: a sequence's mean is its one row (padding rows aside)
            p = torch.addmm(f.bias_row, h, f.proj)
            gate = p[:, :1].sigmoid_()
        else:
            p = torch.addmm(f.bias, h, f.proj)
            gate = p[:, :1]
            gate.copy_(self._pool(f, p, layout).index_select(0, layout.row_seq).unsqueeze(-1))
        p[:, 1:].mul_(gate)
        return p

    @staticmethod
    def _pool(f: _Folded, p: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """``[B + 1]`` per-sequence gates from column 0 of :meth:`_project`'s ``p`` (last: padding)."""
        total = p.new_zeros(layout.num_seqs + 1).index_add_(0, layout.pool_index, p[:, 0])
        return torch.addcdiv(f.gate_shift, total, layout.pool_count).sigmoid_()

    def gate(self, layer: int, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Per-sequence gate ``g`` (``[B]``) from the chunk's mean z-scored state on ``d₀``."""
        f = self._folded[self._slot[layer]]
        p = torch.addmm(f.bias, hidden.float(), f.proj)
        return self._pool(f, p, layout)[:-1]

    def edit(self, layer: int, hidden: torch.Tensor, layout: TokenLayout, rows: torch.Tensor | None,
             phase: Phase) -> torch.Tensor:
        """See :meth:`ResidualEdit.edit`; ``rows=None`` means every row (no masking)."""
        if phase not in self.phases:
            return hidden
        f = self._folded[self._slot[layer]]
        h = hidden if hidden.dtype == torch.float32 else hidden.float()
        new = torch.addmm(h, self._project(f, h, layout), f.out)
        if new.dtype != hidden.dtype:
            new = new.to(hidden.dtype)
        return new if rows is None else torch.where(rows.unsqueeze(-1), new, hidden)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> KIFEdit:
        moved = copy.copy(self)  # the folded constants move as they are (no re-fold, same bits)
        moved.t = {k: v.to(device) for k, v in self.t.items()}
        moved._folded = [_Folded(*(x.to(device) for x in f)) for f in self._folded]
        return moved


_RUNTIME_TENSORS = ("mean", "scale", "signature_z", "directions", "gate_mu", "gate_sigma", "refusal",
                    "residual_norm")


def edits_from_pack(pack: Any) -> KIFEdit:
    """The stable entry point adapters use (also reachable as ``residual.edit_from_pack``)."""
    return KIFEdit.from_pack(pack)


def validate_pack(pack: Any, where: str) -> None:
    """Tensor names, shapes and hyperparameter ranges of a KIF pack."""
    t = pack.tensors
    fix = "re-calibrate with `erasekit calibrate --method kif`"
    for name in ("layers", *_RUNTIME_TENSORS):
        if name not in t:
            raise PackError(where, f"tensors.{name}", "missing", fix)
    layers = t["layers"]
    if layers.dtype != torch.int64 or layers.dim() != 1 or layers.shape[0] < 1:
        raise PackError(where, "tensors.layers", "must be a non-empty int64 vector", fix)
    n, d, n_layers = layers.shape[0], pack.fingerprint.hidden_size, pack.fingerprint.num_layers
    if len(set(layers.tolist())) != n or int(layers.min()) < 0 or int(layers.max()) >= n_layers:
        raise PackError(where, "tensors.layers", f"layer indices {layers.tolist()[:8]} must be distinct and in [0, {n_layers})",
                        "re-calibrate the pack for this model")
    expected = {"mean": (n, d), "scale": (n, d), "signature_z": (n, d), "refusal": (n, d),
                "gate_mu": (n,), "gate_sigma": (n,), "residual_norm": (n,)}
    for name, shape in expected.items():
        if tuple(t[name].shape) != shape:
            raise PackError(where, f"tensors.{name}", f"shape {tuple(t[name].shape)}, expected {shape}", fix)
    dirs = t["directions"]
    if dirs.dim() != 3 or dirs.shape[0] != n or dirs.shape[2] != d or not 1 <= dirs.shape[1] <= 64:
        raise PackError(where, "tensors.directions", f"shape {tuple(dirs.shape)}, expected ({n}, k<=64, {d})", fix)
    if bool((t["scale"] <= 0).any()) or bool((t["gate_sigma"] <= 0).any()):
        raise PackError(where, "tensors.scale", "scales must be positive", fix)
    validate_router(pack, where)
    hp = pack.hyperparameters
    ranges = {"suppression": (0.0, 5.0), "gate_k": (0.0, 100.0), "gate_tau": (-100.0, 100.0),
              "refusal_strength": (-1000.0, 1000.0)}
    for key, (lo, hi) in ranges.items():
        value = hp.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not lo <= value <= hi or not math.isfinite(value):
            raise PackError(where, f"hyperparameters.{key}", f"must be a number in [{lo}, {hi}], got {value!r}",
                            f"set {key} (default {DEFAULT_HYPERPARAMETERS[key]})")
    if hp.get("refusal_strength") and not bool(t["refusal"].any()):
        raise PackError(where, "hyperparameters.refusal_strength",
                        "refusal steering requested but the pack has no refusal direction (calibrated with 0)",
                        "re-calibrate with refusal_strength != 0, or set it to 0")
    if hp.get("refusal_units", "absolute") not in ("absolute", "residual_norm"):
        raise PackError(where, "hyperparameters.refusal_units", f"got {hp.get('refusal_units')!r}",
                        'use "absolute" or "residual_norm"')
    phases = hp.get("phases", ["prefill", "decode"])
    if not isinstance(phases, list) or not phases or any(p not in ("prefill", "decode") for p in phases):
        raise PackError(where, "hyperparameters.phases", f"got {phases!r}", 'use ["prefill", "decode"] or a subset')


register_method(MethodSpec(name=METHOD, family="llm", validate=validate_pack))
register_edit_factory(METHOD, edits_from_pack)
