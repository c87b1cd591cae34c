"""Concept-attention pooling: the fixed feature map CGCE's linear detector reads.

Why a fixed map instead of a learned classifier head: the detector must run three ways that
agree to float precision -- numpy for scikit-learn fitting, ONNX for the production detector,
and torch for the gradient refiner -- and a parameter-free map plus one linear layer is the
smallest thing that does, while still reading *where* in the prompt the concept sits.

The concept embedding ``C`` (``K`` token rows of the generator's own conditioning for the
concept's words) attends over the prompt's per-token conditioning ``E`` (``T x D``) with cosine
scores at temperature ``tau``. Features, per prompt::

    pooled  = sum_t w_t E_t,  w = mean_k softmax_t(cos(E_t, C_k) / tau)     (D)
    mean    = mean_t E_t                                                     (D)
    maxcos  = max_{t,k} cos(E_t, C_k)                                        (1)
    flat    = E_1 .. E_T, concatenated               (T*D, only with flat=True)

so a prompt mentioning the concept (or a paraphrase the text encoder maps nearby) pools the
concept-like token rows, and a prompt without it pools whatever is least unlike it.

Why the optional ``flat`` block: the denoiser cross-attends to *every* token row (a contextual
encoder's padding rows carry the whole sentence too), so a refiner that only moves the pooled
concept-like rows can fool the classifier while the image still shows the concept (measured on
the world: 54 % of circle images survived refinement). A linear term on the whole conditioning
makes the classifier's gradient move every row the denoiser reads, by what each row contributes.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin

EPS = 1e-6


def num_features(dim: int, seq_len: int = 0, flat: bool = False) -> int:
    """Length of the feature vector for conditioning ``[seq_len, dim]`` (``seq_len`` only counts with ``flat``)."""
    return 2 * dim + 1 + (seq_len * dim if flat else 0)


def _unit_np(x: np.ndarray) -> np.ndarray:
    return x / (np.sqrt((x * x).sum(-1, keepdims=True)) + EPS)


def concept_features_np(embeds: np.ndarray, concept: np.ndarray, tau: float, flat: bool = False) -> np.ndarray:
    """Features of ``embeds`` ``[N, T, D]`` for ``concept`` ``[K, D]`` (float32 numpy)."""
    e = embeds.astype(np.float32)
    scores = _unit_np(e) @ _unit_np(concept.astype(np.float32)).T  # N, T, K
    logits = scores / np.float32(tau)
    logits = logits - logits.max(axis=1, keepdims=True)
    att = np.exp(logits)
    att = att / att.sum(axis=1, keepdims=True)
    weights = att.mean(axis=2)  # N, T
    pooled = np.einsum("nt,ntd->nd", weights, e)
    mean = e.mean(axis=1)
    maxcos = scores.reshape(len(e), -1).max(axis=1, keepdims=True)
    parts = [pooled, mean, maxcos] + ([e.reshape(len(e), -1)] if flat else [])
    return np.concatenate(parts, axis=1).astype(np.float32)


def concept_features_torch(embeds: torch.Tensor, concept: torch.Tensor, tau: float, flat: bool = False) -> torch.Tensor:
    """Differentiable twin of :func:`concept_features_np` (same maths, torch ops)."""
    unit_e = embeds / (embeds.norm(dim=-1, keepdim=True) + EPS)
    unit_c = concept / (concept.norm(dim=-1, keepdim=True) + EPS)
    scores = unit_e @ unit_c.T  # N, T, K
    weights = torch.softmax(scores / tau, dim=1).mean(dim=2)  # N, T
    pooled = torch.einsum("nt,ntd->nd", weights, embeds)
    mean = embeds.mean(dim=1)
    maxcos = scores.flatten(1).amax(dim=1, keepdim=True)
    parts = [pooled, mean, maxcos] + ([embeds.flatten(1)] if flat else [])
    return torch.cat(parts, dim=1)


class ConceptAttentionPool(TransformerMixin, BaseEstimator):
    """scikit-learn transformer: flattened conditioning ``[N, T*D]`` -> concept features.

    Stateless apart from its constructor arguments (``fit`` only checks shapes), so it can sit
    in a :class:`~sklearn.pipeline.Pipeline` in front of a scaler and a linear model and be
    exported with skl2onnx through the converter registered in :mod:`erasekit.classifiers.onnx_export`.
    """

    def __init__(self, concept: np.ndarray | None = None, seq_len: int = 77, tau: float = 0.1,
                 flat: bool = False) -> None:
        self.concept = concept
        self.seq_len = seq_len
        self.tau = tau
        self.flat = flat

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> ConceptAttentionPool:
        concept = np.asarray(self.concept, dtype=np.float32)
        if concept.ndim != 2:
            raise ValueError(f"ConceptAttentionPool.concept must be [K, D], got shape {concept.shape}")
        if X.ndim != 2 or X.shape[1] != self.seq_len * concept.shape[1]:
            raise ValueError(f"expected X of shape [N, {self.seq_len}*{concept.shape[1]}], got {X.shape}")
        self.concept_ = concept
        self.dim_ = int(concept.shape[1])
        self.n_features_in_ = int(X.shape[1])
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        embeds = np.asarray(X, dtype=np.float32).reshape(len(X), self.seq_len, self.dim_)
        return concept_features_np(embeds, self.concept_, self.tau, self.flat)
