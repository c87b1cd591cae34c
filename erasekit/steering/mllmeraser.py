"""MLLMEraser: input-aware activation steering (arXiv 2510.04217, built on AlphaSteer).

Per decoder layer ``l`` the method learns a linear map ``W_l`` such that ``h_last W_l`` is the
erasure direction for forget-like inputs and close to zero for retain-like inputs, and at
prefill adds ``λ · h_last W_l`` to every position of the prompt. There is no threshold: the
input awareness is the null-space projector ``P_l`` (directions retain activations do not
use), so for retain inputs ``h P ≈ 0`` and the edit vanishes.

Calibration (closed form, no gradients), per layer, on decoder-layer OUTPUTS — the same tensor
the hook edits (the reference code reads block inputs; that off-by-one is not copied):

* ``r = mean h(recall) − mean h(erasure)`` over ≤ 16 contrast pairs (last-token activations);
* ``Q`` = the ``null_ratio · d`` eigenvectors of ``H_rᵀ H_r`` with the smallest eigenvalues,
  ``P = Q Qᵀ``;
* ridge ``Δ̃ = (XᵀX + γ PᵀP)⁺ Xᵀ (1 rᵀ)`` with ``X = H_f P``; ``W = P Δ̃``.

Because ``Q`` has orthonormal columns, with ``Y = H_f Q`` this is exactly
``W = Q a rᵀ`` where ``a = (YᵀY + γ I)⁻¹ Yᵀ 1`` (k-vector). The pack therefore stores the
low-rank factors ``Q`` (``null_basis``), ``a`` (``ridge_coef``) and ``r`` (``direction``) —
never the dense ``d × d`` map — and inference costs one dot product per row and layer (taken
on every row, then each sequence's last one read: one op fewer than gathering the last rows
first): ``h_last W = (h_last · Q a) r``.

Pure tensor math: no framework imports. Adapters call :meth:`MLLMEraserEdit.edit`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from erasekit.errors import PackError
from erasekit.guardrails.methods import MethodSpec, register_method
from erasekit.steering.residual import Phase, ResidualEdit, TokenLayout, register_edit_factory
from erasekit.steering.router import validate_router

METHOD = "mllmeraser"

#: Defaults from the reference code (MLLMU_eval_steering.py / AlphaSteer); λ is tuned per model.
DEFAULT_HYPERPARAMETERS: dict[str, Any] = {
    "strength": -0.2,      # λ; negative pushes recall → erasure, since r = recall − erasure
    "null_ratio": 0.3,     # fraction of d kept as the retain null space
    "ridge_gamma": 0.1,    # γ
    "max_pairs": 16,       # contrast pairs used for the direction
    "layers": None,        # None: every decoder layer except the first (reference: 1..L-1)
}


def fit_mllmeraser(
    recall: torch.Tensor,
    erasure: torch.Tensor,
    forget: torch.Tensor,
    retain: torch.Tensor,
    *,
    null_ratio: float = 0.3,
    ridge_gamma: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Closed-form calibration from last-token activations stacked per layer.

    Args:
        recall, erasure: ``[L, P, d]`` activations of the contrast pairs (P ≤ 16).
        forget, retain: ``[L, N, d]`` activations of forget-set and retain-set prompts.

    Returns ``direction`` ``[L, d]``, ``null_basis`` ``[L, d, k]`` and ``ridge_coef`` ``[L, k]``
    (float32), with ``W_l = null_basis[l] @ ridge_coef[l] ⊗ direction[l]``.
    """
    for name, t in (("recall", recall), ("erasure", erasure), ("forget", forget), ("retain", retain)):
        if t.dim() != 3 or t.shape[1] == 0:
            raise ValueError(f"{name} must be a non-empty [layers, n, d] tensor, got shape {tuple(t.shape)}")
    if not 0.0 < null_ratio < 1.0:
        raise ValueError(f"null_ratio must be in (0, 1), got {null_ratio}")
    if ridge_gamma <= 0:
        raise ValueError(f"ridge_gamma must be > 0, got {ridge_gamma}")
    work = torch.float64
    direction = recall.to(work).mean(1) - erasure.to(work).mean(1)  # [L, d]
    d = direction.shape[-1]
    k = max(1, int(round(null_ratio * d)))
    h_r = retain.to(work)
    # eigh returns ascending eigenvalues: the first k eigenvectors span the directions retain
    # activations use least (the SVD of H_rᵀH_r in the reference, same subspace).
    _, eigvecs = torch.linalg.eigh(h_r.transpose(1, 2) @ h_r)
    null_basis = eigvecs[:, :, :k]  # [L, d, k]
    y = forget.to(work) @ null_basis  # [L, N, k]
    gram = y.transpose(1, 2) @ y + ridge_gamma * torch.eye(k, dtype=work)
    ridge_coef = torch.linalg.solve(gram, y.sum(1))  # (YᵀY + γI)⁻¹ Yᵀ 1, [L, k]
    return {
        "direction": direction.float().contiguous(),
        "null_basis": null_basis.float().contiguous(),
        "ridge_coef": ridge_coef.float().contiguous(),
    }


class MLLMEraserEdit(ResidualEdit):
    """Prefill-only, input-aware steering ``h ← h + λ (h_last · u_l) r_l`` with ``u_l = Q_l a_l``.

    Args:
        concept: concept name.
        layers: decoder-layer indices (outputs edited), one per row of the tensors.
        direction: ``[L, d]`` erasure directions ``r_l``.
        readout: ``[L, d]`` ``u_l = Q_l a_l`` (so ``W_l = u_l r_lᵀ``).
        strength: λ.
    """

    phases = frozenset({Phase.PREFILL})

    def __init__(self, concept: str, layers: tuple[int, ...], direction: torch.Tensor,
                 readout: torch.Tensor, strength: float):
        self.concept = concept
        self.layers = tuple(int(x) for x in layers)
        self.direction = direction
        self.readout = readout
        self.strength = float(strength)
        self._slot = {layer: i for i, layer in enumerate(self.layers)}
        # per layer slot, λ r_l (folded once) and u_l, as contiguous float32 vectors
        self._steer = [(self.strength * direction[i]).float().contiguous() for i in range(len(self.layers))]
        self._readout = [readout[i].float().contiguous() for i in range(len(self.layers))]

    @classmethod
    def from_pack(cls, pack: Any) -> MLLMEraserEdit:
        t = pack.tensors
        readout = (t["null_basis"].float() @ t["ridge_coef"].float().unsqueeze(-1)).squeeze(-1)
        return cls(pack.name, tuple(t["layers"].tolist()), t["direction"].float(), readout,
                   pack.hyperparameters["strength"])

    def steering_vectors(self, layer: int, h_last: torch.Tensor) -> torch.Tensor:
        """``λ h_last W_l`` for a ``[B, d]`` batch of last-token states (float32)."""
        i = self._slot[layer]
        return torch.outer(torch.mv(h_last.float(), self._readout[i]), self._steer[i])

    def edit(self, layer: int, hidden: torch.Tensor, layout: TokenLayout, rows: torch.Tensor | None,
             phase: Phase) -> torch.Tensor:
        """See :meth:`ResidualEdit.edit`; ``rows=None`` means every row (no masking).

        Three ops in float32 (five in other dtypes, plus the mask): ``h · u`` for every row, each
        row's sequence's last-token value gathered, and ``h + coeff ⊗ λ r`` in one ``addr``.
        """
        if phase is not Phase.PREFILL:
            return hidden
        i = self._slot[layer]
        h = hidden if hidden.dtype == torch.float32 else hidden.float()
        coeff = torch.mv(h, self._readout[i]).index_select(0, layout.row_last)  # [N]: its sequence's h_last · u
        new = torch.addr(h, coeff, self._steer[i])
        if new.dtype != hidden.dtype:
            new = new.to(hidden.dtype)
        return new if rows is None else torch.where(rows.unsqueeze(-1), new, hidden)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> MLLMEraserEdit:
        moved = copy.copy(self)  # the folded vectors move as they are (same bits on every device)
        moved.direction, moved.readout = self.direction.to(device), self.readout.to(device)
        moved._steer = [v.to(device) for v in self._steer]
        moved._readout = [v.to(device) for v in self._readout]
        return moved


def edits_from_pack(pack: Any) -> MLLMEraserEdit:
    """The stable entry point adapters use (also reachable as ``residual.edit_from_pack``)."""
    return MLLMEraserEdit.from_pack(pack)


def validate_pack(pack: Any, where: str) -> None:
    """Tensor names, shapes and hyperparameter ranges of an MLLMEraser pack."""
    t = pack.tensors
    for name in ("layers", "direction", "null_basis", "ridge_coef"):
        if name not in t:
            raise PackError(where, f"tensors.{name}", "missing", "re-calibrate with `erasekit calibrate --method mllmeraser`")
    layers, direction, basis, coef = t["layers"], t["direction"], t["null_basis"], t["ridge_coef"]
    hidden = pack.fingerprint.hidden_size
    n = layers.shape[0] if layers.dim() == 1 else -1
    if layers.dtype != torch.int64 or n < 1:
        raise PackError(where, "tensors.layers", "must be a non-empty int64 vector", "re-calibrate the pack")
    if len(set(layers.tolist())) != n or int(layers.min()) < 0 or int(layers.max()) >= pack.fingerprint.num_layers:
        raise PackError(where, "tensors.layers",
                        f"layer indices {layers.tolist()[:8]} must be distinct and in [0, {pack.fingerprint.num_layers})",
                        "re-calibrate the pack for this model")
    if tuple(direction.shape) != (n, hidden):
        raise PackError(where, "tensors.direction", f"shape {tuple(direction.shape)}, expected {(n, hidden)}",
                        "re-calibrate the pack")
    if basis.dim() != 3 or tuple(basis.shape[:2]) != (n, hidden) or not 0 < basis.shape[2] < hidden:
        raise PackError(where, "tensors.null_basis", f"shape {tuple(basis.shape)}, expected ({n}, {hidden}, k<{hidden})",
                        "re-calibrate the pack")
    if tuple(coef.shape) != (n, basis.shape[2]):
        raise PackError(where, "tensors.ridge_coef", f"shape {tuple(coef.shape)}, expected {(n, basis.shape[2])}",
                        "re-calibrate the pack")
    validate_router(pack, where)
    strength = pack.hyperparameters.get("strength")
    if not isinstance(strength, int | float) or isinstance(strength, bool) or not -10.0 <= strength <= 10.0:
        raise PackError(where, "hyperparameters.strength", f"must be a number in [-10, 10], got {strength!r}",
                        "set strength (λ) to about -0.2 .. -0.5")


register_method(MethodSpec(name=METHOD, family="llm", validate=validate_pack))
register_edit_factory(METHOD, edits_from_pack)
