"""Torch twin of the CGCE detector and the gradient refiner that uses it.

ONNX answers "is the concept there?"; it cannot say "which way is away from it". The twin is the
same function in torch -- the fixed concept-attention features followed by the detector's
standardisation and logistic regression folded into one linear layer -- so its gradient with
respect to the prompt embedding is the CGCE guidance direction.

Refinement (CGCE, arXiv 2511.05865): ``E <- E - sum_c a_c grad_E f_c(E)`` over every classifier
``c`` that still fires on the row, until all logits fall under their target or ``max_steps`` are
spent. Only the flagged rows move; the rest are copied bit for bit. An optional *anchor* twin is
the same step with the sign turned: it pulls a flagged row up onto the anchor's target logit (towards
a named neutral value, e.g. "plain" for a pattern), see :func:`refine`.

The step sizes ``a_c`` are not a fixed learning rate: each step is the Gauss-Newton (Polyak)
step that would put every firing classifier's *linearised* logit exactly on its target,
``a = eta * G^-1 (f(E) - target)`` with ``G_cd = <grad f_c, grad f_d>`` (a ``C x C`` system per
row; one classifier: ``a = eta (f - target) / |grad f|^2``). For the linear part of the twin one
step is exact; the attention-pooled part needs a few (measured on the world: 4-12 steps, against
100 fixed-size steps that never reached the target). Several concepts still sum their guidance
directions; the system only decides how much of each.

Cost per step (it runs before the first denoiser call, on the denoiser's device, so on a GPU it is
launch- and sync-bound, not FLOP-bound): one forward and one backward of the twin's non-linear
part (the attention-pooled and max-cosine features; the mean and flat features are linear, so
their gradient is a constant folded once per twin), a closed-form step for one classifier (no
solver), ``torch.linalg.solve_ex`` for several (no per-step info sync; singular systems are still
raised, checked in the same transfer as convergence), and exactly one host-device sync: the
``active.any()`` convergence check, which is what lets a refinement stop after the 4-12 steps it
needs instead of running ``max_steps``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.pipeline import Pipeline

from erasekit.classifiers.features import EPS, concept_features_torch

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
    #: derived tensors, built once per device (see :meth:`to` and :meth:`_parts`)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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
        """The twin on ``device``; the copy is kept, so a guard calling this per request copies once."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.concept.device == device:
            return self
        key = ("to", device)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = TorchTwin(
                self.concept.to(device), self.weight.to(device), self.bias.to(device), self.tau, self.flat
            )
        return hit

    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """Detector logits for conditioning ``[N, T, D]`` (computed in float32)."""
        feats = concept_features_torch(embeds.float(), self.concept, self.tau, self.flat)
        return feats @ self.weight + self.bias

    def _parts(self, seq_len: int, dim: int) -> tuple[torch.Tensor, ...]:
        """``(unit concept [K, D], w_pooled [D], w_maxcos [], linear gradient [T, D], w_linear [T*D] or None, w_mean [D])``.

        The mean and flat features are linear in the conditioning: their part of the logit is
        ``x.flatten(1) @ w_linear`` (the mean's weight spread over the positions and added to the
        flat weight) and their part of the gradient is the constant ``linear gradient``.
        """
        key = ("parts", seq_len, dim)
        hit = self._cache.get(key)
        if hit is None:
            w = self.weight
            unit_c = self.concept / (self.concept.norm(dim=-1, keepdim=True) + EPS)
            w_pool, w_mean, w_max = w[:dim], w[dim : 2 * dim], w[2 * dim]
            lin_grad = (w_mean / seq_len).expand(seq_len, dim)
            w_lin = None
            if self.flat:
                lin_grad = w[2 * dim + 1 :].view(seq_len, dim) + lin_grad
                w_lin = lin_grad.reshape(-1)
            hit = self._cache[key] = (unit_c, w_pool, w_max, lin_grad.contiguous(), w_lin, w_mean)
        return hit

    def logits_for_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Logits ``[N]`` of float32 ``x`` ``[N, T, D]``, and a function that returns their gradient
        ``d logit_n / d x_n`` ``[N, T, D]`` (call it with grad enabled, at most once).

        The same function as :meth:`logits` (equal to float rounding: the linear terms are summed
        in another order); autograd runs through the non-linear features only, and only when the
        gradient is asked for.
        """
        n, t, d = x.shape
        unit_c, w_pool, w_max, lin_grad, w_lin, w_mean = self._parts(t, d)
        xg = x.detach().requires_grad_(True)
        unit_e = xg / (xg.norm(dim=-1, keepdim=True) + EPS)
        scores = unit_e @ unit_c.T  # N, T, K
        weights = torch.softmax(scores / self.tau, dim=1).mean(dim=2)  # N, T
        pooled = torch.einsum("nt,ntd->nd", weights, xg)
        maxcos = scores.flatten(1).amax(dim=1)
        nonlinear = torch.addmv(maxcos * w_max, pooled, w_pool)  # N
        x0 = x.detach()
        linear = x0.flatten(1) @ w_lin if w_lin is not None else x0.mean(dim=1) @ w_mean

        def grad() -> torch.Tensor:
            (g,) = torch.autograd.grad(nonlinear.sum(), xg)  # rows are independent
            return g + lin_grad

        return nonlinear.detach() + linear + self.bias, grad


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
    anchors: list[bool] | None = None,
) -> RefineResult:
    """Push the ``rows`` (``[C, N]`` bool: classifier ``c`` fired on row ``n``) of ``embeds`` under their targets (anchors: above).

    Targets are probabilities (``targets``) or logits (``target_logits``, which win when given:
    margin targets below any useful probability stay exact). ``etas`` scale each classifier's
    Gauss-Newton step (1.0: aim exactly at the target).

    ``anchors[c]`` True makes twin ``c`` an *anchor* (Concept Ablation / ESD-style "steer towards
    a painting", not only away from "Van Gogh"): it is pushed ABOVE its target instead of under
    it. Nothing else changes: the Gauss-Newton step already puts every active linearised logit
    exactly on its target, so an anchor is simply active on its rows while its logit is below its
    target, and its negative residual turns its step around. ``None`` (or all False) is the plain
    CGCE refinement, bit for bit.

    Returns a new tensor; rows no classifier
    flagged are bit-identical to the input. The update is computed without a graph and added as
    a constant, so code that differentiates through a guarded denoiser sees a straight-through
    shift (d out / d in = I). Works under ``torch.no_grad`` and ``torch.inference_mode``.
    """
    if target_logits is None:
        if targets is None:
            raise ValueError("refine needs targets or target_logits")
        target_logits = [_logit(t) for t in targets]
    per_twin = {"etas": etas, "targets/target_logits": target_logits, "anchors": anchors}
    for name, values in per_twin.items():
        if values is not None and len(values) != len(twins):
            raise ValueError(f"refine: {name} has {len(values)} entries for {len(twins)} twins; pass one per twin")
    if rows.ndim != 2 or rows.shape != (len(twins), embeds.shape[0]):
        raise ValueError(f"refine: rows has shape {list(rows.shape)}, expected [{len(twins)} twins, "
                         f"{embeds.shape[0]} rows of embeds]")
    base = embeds.detach()
    with torch.inference_mode(False), torch.enable_grad():
        full = base.float().clone()  # a normal tensor even when ``embeds`` is an inference tensor
        device = full.device
        rows = rows.to(device)
        moved = rows.any(dim=0)
        initial = torch.stack([tw.logits(full).detach() for tw in twins]).sigmoid()  # C, N (all rows)
        # Every row goes through the loop (unflagged ones with a zero step), not only the flagged
        # ones: a row's result must not depend on how many neighbours were flagged, and on CUDA
        # the matmul shapes (hence the rounding) would (measured on an H200: a toggled prompt's
        # image differed between a mixed batch and an all-toggled one).
        if max_steps <= 0:
            out, steps, final = base.clone(), 0, initial.clone()
        else:
            x, steps, z = _refine_rows(full, twins, rows, etas, max_steps, target_logits, anchors)
            final = torch.where(moved, torch.sigmoid(z), initial)  # unflagged rows: their scores as given
            out = torch.where(moved[:, None, None], x.to(base.dtype).view_as(base), base)
    if embeds.requires_grad:
        out = embeds + (out - base)
    return RefineResult(out, steps, initial, final)


def _refine_rows(
    x: torch.Tensor,
    twins: list[TorchTwin],
    sub_rows: torch.Tensor,
    etas: list[float],
    max_steps: int,
    target_logits: list[float],
    anchors: list[bool] | None = None,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The refinement loop on ``x`` (all rows, float32; ``sub_rows`` [C, N] says who is flagged); call with grad enabled."""
    n_c, device = len(twins), x.device
    goal = torch.tensor(target_logits, dtype=torch.float32)[:, None].to(device, non_blocking=True)  # C, 1
    eta = torch.tensor(etas, dtype=torch.float32)[:, None].to(device, non_blocking=True)  # C, 1
    # anchors: C, 1 bool (pushed above their target), or None -- then the loop is the plain one
    above = torch.tensor(anchors)[:, None].to(device, non_blocking=True) if anchors and any(anchors) else None
    failed = None  # several classifiers: did a Gauss-Newton solve fail (checked with convergence)?
    steps = 0
    for steps in range(max_steps + 1):
        pairs = [tw.logits_for_grad(x) for tw in twins]
        z = torch.stack([p[0] for p in pairs])  # C, M
        excess = z - goal
        # re-checked every step: one concept's push may revive another; an anchor is active while
        # it is UNDER its target (its residual ``excess`` is then negative, and so is its step)
        active = sub_rows & ((excess > 0) if above is None else torch.where(above, excess < 0, excess > 0))
        if steps == max_steps:
            break
        # The one host-device sync per step: stop as soon as every flagged row is on its side of target.
        if failed is None:
            go = bool(active.any())
        else:  # one transfer for both: 1 = go on, 2 or 3 = the last solve failed
            code = int(active.any() + 2 * failed)
            if code >= 2:
                raise torch.linalg.LinAlgError("CGCE refine: the Gauss-Newton system is singular")
            go = code == 1
        if not go:
            break
        norm_x = x.flatten(1).norm(dim=1)
        if n_c == 1:
            # a = eta (f - target) / |grad f|^2 on active rows, 0 elsewhere; |delta| = |a| |grad f|
            grad = pairs[0][1]()
            sq = (grad * grad).flatten(1).sum(dim=1)
            alpha = torch.where(active[0], excess[0] / (sq + 1e-12), 0.0) * eta[0]
            step_norm = alpha.abs() * sq.sqrt()
        else:
            grads = torch.stack([p[1]() for p in pairs]).flatten(2)  # C, M, F
            a = active.T.float()  # M, C
            gram = torch.einsum("cnf,dnf->ncd", grads, grads) * a[:, :, None] * a[:, None, :]
            # Inactive classifiers get an identity row (alpha = 0); a small ridge relative to the
            # diagonal keeps nearly parallel guidance directions (related concepts) from blowing up.
            ridge = 1e-4 * gram.diagonal(dim1=1, dim2=2).amax(dim=1) + 1e-12  # M
            gram = gram + torch.diag_embed(1 - a) + ridge[:, None, None] * torch.eye(n_c, device=device)
            residual = (excess * active).T  # M, C
            solved, info = torch.linalg.solve_ex(gram, residual[..., None])
            failed = info.ne(0).any()
            coef = solved[..., 0] * eta.T * a  # M, C
            delta = torch.einsum("nc,cnf->nf", coef, grads)
            step_norm = delta.norm(dim=1)
        # trust region: no step longer than MAX_STEP_FRACTION of the row's norm
        scale = (MAX_STEP_FRACTION * norm_x / step_norm.clamp_min(1e-12)).clamp(max=1.0)
        if n_c == 1:
            x = torch.addcmul(x, grad, (alpha * scale)[:, None, None], value=-1)
        else:
            x = x - (delta * scale[:, None]).view_as(x)
    return x, steps, z
