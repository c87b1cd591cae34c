"""Torch twin of the CGCE detector and the gradient refiner that uses it.

ONNX answers "is the concept there?"; it cannot say "which way is away from it". The twin is the
same function in torch -- the fixed concept-attention features followed by the detector's
standardisation and logistic regression folded into one linear layer -- so its gradient with
respect to the prompt embedding is the CGCE guidance direction.

Refinement (CGCE, arXiv 2511.05865): ``E <- E - sum_c eta_c grad_E BCE(f_c(E), safe)`` over
every classifier ``c`` that still fires, until all scores fall under their target or
``max_steps`` are spent. Only the flagged rows move; the rest are copied bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.pipeline import Pipeline

from erasekit.classifiers.features import concept_features_torch

#: Largest refinement step, as a fraction of the prompt embedding's norm.
MAX_STEP_FRACTION = 0.1


@dataclass
class TorchTwin:
    """``logit(E) = w . features(E; concept, tau) + b`` -- the detector without the sigmoid."""

    concept: torch.Tensor  # K, D
    weight: torch.Tensor  # F
    bias: torch.Tensor  # 1
    tau: float

    @classmethod
    def from_detector(cls, detector: Pipeline) -> TorchTwin:
        pool, scaler, clf = (step for _, step in detector.steps)
        coef = clf.coef_[0].astype(np.float64)
        scale = scaler.scale_ if scaler.scale_ is not None else np.ones_like(coef)
        weight = coef / scale
        bias = clf.intercept_[0] - float((coef * scaler.mean_ / scale).sum())
        return cls(
            concept=torch.from_numpy(np.asarray(pool.concept_, np.float32).copy()),
            weight=torch.from_numpy(weight.astype(np.float32)),
            bias=torch.tensor([bias], dtype=torch.float32),
            tau=float(pool.tau),
        )

    def to(self, device: torch.device | str) -> TorchTwin:
        return TorchTwin(self.concept.to(device), self.weight.to(device), self.bias.to(device), self.tau)

    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """Detector logits for conditioning ``[N, T, D]`` (computed in float32)."""
        feats = concept_features_torch(embeds.float(), self.concept, self.tau)
        return feats @ self.weight + self.bias


@dataclass(frozen=True)
class RefineResult:
    embeds: torch.Tensor
    steps: int
    initial_scores: torch.Tensor  # C, N
    final_scores: torch.Tensor  # C, N


def refine(
    embeds: torch.Tensor,
    twins: list[TorchTwin],
    rows: torch.Tensor,
    *,
    etas: list[float],
    max_steps: int,
    targets: list[float],
) -> RefineResult:
    """Push the ``rows`` (``[C, N]`` bool: classifier ``c`` fired on row ``n``) of ``embeds`` under ``targets``.

    Returns a new tensor; rows no classifier flagged are bit-identical to the input. The
    update is computed without a graph and added as a constant, so code that differentiates
    through a guarded denoiser sees a straight-through shift (d out / d in = I).
    """
    base = embeds.detach()
    x = base.float().clone()
    active = rows.clone()
    target_logits = torch.tensor([float(np.log(t / (1 - t))) for t in targets], device=x.device)[:, None]
    step_sizes = torch.tensor(etas, device=x.device)[:, None]
    initial = None
    steps = 0
    with torch.enable_grad():
        for steps in range(max_steps + 1):
            x.requires_grad_(True)
            logits = torch.stack([tw.logits(x) for tw in twins])  # C, N
            if initial is None:
                initial = torch.sigmoid(logits.detach())
            active = active & (logits.detach() > target_logits)
            if steps == max_steps or not bool(active.any()):
                break
            # BCE(sigmoid(z), 0) = softplus(z): each firing classifier's guidance, scaled by its
            # own step size, summed (CGCE's multi-concept aggregation).
            loss = (torch.nn.functional.softplus(logits) * active * step_sizes).sum()
            (grad,) = torch.autograd.grad(loss, x)
            # Trust region: one step moves a prompt by at most MAX_STEP_FRACTION of its own norm,
            # so an ill-conditioned classifier (a near-constant feature with a huge weight) cannot
            # throw the embedding to inf/NaN; well-conditioned steps are not affected.
            limit = MAX_STEP_FRACTION * x.detach().flatten(1).norm(dim=1)
            scale = (limit / grad.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
            x = (x.detach() - grad * scale[:, None, None]).detach()
    final = torch.sigmoid(logits.detach())
    moved = rows.any(dim=0)
    out = torch.where(moved[:, None, None], x.detach().to(embeds.dtype), base)
    if embeds.requires_grad:
        out = embeds + (out - base)
    return RefineResult(out, steps, initial, final)
