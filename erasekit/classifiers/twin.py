"""Torch twin of the CGCE detector and the gradient refiner that uses it.

ONNX answers "is the concept there?"; it cannot say "which way is away from it". The twin is the
same function in torch -- the fixed concept-attention features followed by the detector's
standardisation and logistic regression folded into one linear layer -- so its gradient with
respect to the prompt embedding is the CGCE guidance direction.

Refinement (CGCE, arXiv 2511.05865): ``E <- E - sum_c a_c grad_E f_c(E)`` over every classifier
``c`` that still fires on the row, until all logits fall under their target or ``max_steps`` are
spent. Only the flagged rows move; the rest are copied bit for bit.

The step sizes ``a_c`` are not a fixed learning rate: each step is the Gauss-Newton (Polyak)
step that would put every firing classifier's *linearised* logit exactly on its target,
``a = eta * G^-1 (f(E) - target)`` with ``G_cd = <grad f_c, grad f_d>`` (a ``C x C`` system per
row; one classifier: ``a = eta (f - target) / |grad f|^2``). For the linear part of the twin one
step is exact; the attention-pooled part needs a few (measured on the world: 4-12 steps, against
100 fixed-size steps that never reached the target). Several concepts still sum their guidance
directions; the system only decides how much of each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.pipeline import Pipeline

from erasekit.classifiers.features import concept_features_torch

#: Largest refinement step, as a fraction of the prompt embedding's norm (a trust region against
#: a near-singular step on a nearly flat logit; the world's refinements move 0.4-1.0 of the norm).
MAX_STEP_FRACTION = 0.5


@dataclass
class TorchTwin:
    """``logit(E) = w . features(E; concept, tau) + b`` -- the detector without the sigmoid."""

    concept: torch.Tensor  # K, D
    weight: torch.Tensor  # F
    bias: torch.Tensor  # 1
    tau: float
    flat: bool = False

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
            flat=bool(getattr(pool, "flat", False)),
        )

    def to(self, device: torch.device | str) -> TorchTwin:
        return TorchTwin(self.concept.to(device), self.weight.to(device), self.bias.to(device), self.tau, self.flat)

    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """Detector logits for conditioning ``[N, T, D]`` (computed in float32)."""
        feats = concept_features_torch(embeds.float(), self.concept, self.tau, self.flat)
        return feats @ self.weight + self.bias


@dataclass(frozen=True)
class RefineResult:
    embeds: torch.Tensor
    steps: int
    initial_scores: torch.Tensor  # C, N
    final_scores: torch.Tensor  # C, N


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def refine(
    embeds: torch.Tensor,
    twins: list[TorchTwin],
    rows: torch.Tensor,
    *,
    etas: list[float],
    max_steps: int,
    targets: list[float] | None = None,
    target_logits: list[float] | None = None,
) -> RefineResult:
    """Push the ``rows`` (``[C, N]`` bool: classifier ``c`` fired on row ``n``) of ``embeds`` under their targets.

    Targets are probabilities (``targets``) or logits (``target_logits``, which win when given:
    margin targets below any useful probability stay exact). ``etas`` scale each classifier's
    Gauss-Newton step (1.0: aim exactly at the target). Returns a new tensor; rows no classifier
    flagged are bit-identical to the input. The update is computed without a graph and added as
    a constant, so code that differentiates through a guarded denoiser sees a straight-through
    shift (d out / d in = I). Works under ``torch.no_grad`` and ``torch.inference_mode``.
    """
    if target_logits is None:
        if targets is None:
            raise ValueError("refine needs targets or target_logits")
        target_logits = [_logit(t) for t in targets]
    base = embeds.detach()
    moved = rows.any(dim=0)
    n_c = len(twins)
    with torch.inference_mode(False), torch.enable_grad():
        x = base.float().clone()  # a normal tensor even when ``embeds`` is an inference tensor
        goal = torch.tensor(target_logits, device=x.device, dtype=torch.float32)[:, None]  # C, 1
        eta = torch.tensor(etas, device=x.device, dtype=torch.float32)[:, None]  # C, 1
        rows = rows.to(x.device).clone()
        initial = None
        steps = 0
        for steps in range(max_steps + 1):
            x.requires_grad_(True)
            logits = torch.stack([tw.logits(x) for tw in twins])  # C, N
            z = logits.detach()
            if initial is None:
                initial = torch.sigmoid(z)
            active = rows & (z > goal)  # re-checked every step: one concept's push may revive another
            if steps == max_steps or not bool(active.any()):
                break
            grads = torch.stack([
                torch.autograd.grad(logits[c].sum(), x, retain_graph=c < n_c - 1)[0] for c in range(n_c)
            ]).flatten(2)  # C, N, F  (rows are independent, so d sum / d x_n = d logit_n / d x_n)
            a = active.T.float()  # N, C
            gram = torch.einsum("cnf,dnf->ncd", grads, grads) * a[:, :, None] * a[:, None, :]
            # Inactive classifiers get an identity row (alpha = 0); a small ridge relative to the
            # diagonal keeps nearly parallel guidance directions (related concepts) from blowing up.
            # (One classifier: no ridge, the step is exact.)
            ridge = (1e-4 if n_c > 1 else 0.0) * gram.diagonal(dim1=1, dim2=2).amax(dim=1) + 1e-12  # N
            gram = gram + torch.diag_embed(1 - a) + ridge[:, None, None] * torch.eye(n_c, device=x.device)
            residual = ((z - goal) * active).T  # N, C
            alpha = torch.linalg.solve(gram, residual[..., None])[..., 0] * eta.T * a  # N, C
            delta = torch.einsum("nc,cnf->nf", alpha, grads)
            limit = MAX_STEP_FRACTION * x.detach().flatten(1).norm(dim=1)
            scale = (limit / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
            x = (x.detach() - (delta * scale[:, None]).view_as(x)).detach()
        final = torch.sigmoid(logits.detach())
        out = torch.where(moved[:, None, None].to(x.device), x.detach().to(embeds.dtype), base)
    if embeds.requires_grad:
        out = embeds + (out - base)
    return RefineResult(out, steps, initial, final)
