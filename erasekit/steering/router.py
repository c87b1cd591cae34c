"""Which prompts a concept applies to: sentence-embedding centroid cosine, plus keywords.

KIF's runtime router (module E of the reference code) arms a subject's capsule when the prompt's
all-MiniLM-L6-v2 embedding has cosine ≥ 0.68 to the centroid of that subject's calibration
prompts, or when a subject keyword occurs. erasekit makes the router a property of the *pack*,
usable by any LLM method: a pack that stores ``router_centroid`` gets a router.

Why it matters beyond efficacy: a row the router does not fire for is never edited, so benign
traffic stays bit-identical to the unguarded model, and the decision is a pure function of the
prompt text, so a separate process (the vLLM plugin) can make it from the request alone::

    router = ConceptRouter.from_pack(pack)      # None if the pack has no router
    active = router is None or router.matches(prompt_text)

The embedding model is loaded lazily with transformers (this module has no import-time
framework dependency) and cached per path, read-only, so routers share one copy.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from erasekit.errors import ErasekitError

#: Where the sentence embedder comes from: ``$ERASEKIT_ROUTER_MODEL`` or the offline MiniLM fixture.
ROUTER_MODEL_ENV = "ERASEKIT_ROUTER_MODEL"
ROUTER_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_THRESHOLD = 0.68


def default_embedder_path() -> Path:
    env = os.environ.get(ROUTER_MODEL_ENV)
    if env:
        return Path(env)
    from erasekit.testing.assets import minilm_dir

    return minilm_dir()


class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings: mean pooling over tokens, L2-normalised."""

    def __init__(self, path: str | os.PathLike[str]):
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ErasekitError(str(path), None, "not a sentence-embedding model directory (no config.json)",
                                f"point {ROUTER_MODEL_ENV} at an all-MiniLM-L6-v2 folder")
        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=256, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)


@functools.lru_cache(maxsize=4)
def get_embedder(path: str | None = None) -> SentenceEmbedder:
    """A shared, read-only embedder (loading MiniLM costs ~1 s; do it once per process)."""
    return SentenceEmbedder(path or default_embedder_path())


def fit_centroid(prompts: Sequence[str], embedder: SentenceEmbedder | None = None) -> torch.Tensor:
    """Unit centroid of the concept's prompts in sentence-embedding space."""
    emb = (embedder or get_embedder()).embed(list(prompts))
    return torch.nn.functional.normalize(emb.mean(0), dim=0)


def _keyword_pattern(keywords: Sequence[str]) -> re.Pattern[str] | None:
    words = [k.strip() for k in keywords if k and k.strip()]
    if not words:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)", re.IGNORECASE)


class ConceptRouter:
    """Decides from the prompt text alone whether a concept applies.

    Args:
        concept: concept name.
        centroid: unit ``[384]`` centroid (``None``: keywords only).
        threshold: cosine needed to fire (0.68 in KIF).
        keywords: whole-word, case-insensitive matches that fire regardless of the embedding.
        embedder_path: sentence-embedding model folder (default: the MiniLM fixture).
    """

    def __init__(self, concept: str, centroid: torch.Tensor | None, threshold: float = DEFAULT_THRESHOLD,
                 keywords: Sequence[str] = (), embedder_path: str | None = None):
        self.concept = concept
        self.centroid = None if centroid is None else torch.nn.functional.normalize(centroid.float(), dim=0)
        self.threshold = float(threshold)
        self.keywords = tuple(keywords)
        self._pattern = _keyword_pattern(self.keywords)
        self.embedder_path = embedder_path

    @classmethod
    def from_pack(cls, pack: Any, embedder_path: str | None = None) -> ConceptRouter | None:
        """The pack's router, or ``None`` when the pack was calibrated without one."""
        hp = pack.hyperparameters
        centroid = pack.tensors.get("router_centroid")
        keywords = tuple(pack.concept.keywords) if hp.get("router_keywords", True) else ()
        if centroid is None and not hp.get("router", False):
            return None
        return cls(pack.name, centroid, hp.get("router_threshold", DEFAULT_THRESHOLD), keywords, embedder_path)

    def keyword_hit(self, text: str) -> bool:
        return bool(self._pattern and self._pattern.search(text))

    def similarities(self, texts: Sequence[str]) -> torch.Tensor:
        """Cosine of each text to the centroid (``-1`` when there is no centroid)."""
        if self.centroid is None:
            return torch.full((len(texts),), -1.0)
        emb = get_embedder(self.embedder_path).embed(list(texts))
        return emb @ self.centroid

    def matches_batch(self, texts: Sequence[str]) -> list[bool]:
        hits = [self.keyword_hit(t) for t in texts]
        pending = [i for i, h in enumerate(hits) if not h]
        if pending and self.centroid is not None:
            sims = self.similarities([texts[i] for i in pending]).tolist()
            for i, s in zip(pending, sims, strict=True):
                hits[i] = s >= self.threshold
        return hits

    def matches(self, text: str) -> bool:
        """Does this concept apply to ``text``? (keyword hit, or centroid cosine ≥ threshold)"""
        return self.matches_batch([text])[0]


def validate_router(pack: Any, where: str) -> None:
    """Shared check for packs that carry a router (called by LLM methods' validators)."""
    from erasekit.errors import PackError

    centroid = pack.tensors.get("router_centroid")
    if centroid is not None and (centroid.dim() != 1 or not 8 <= centroid.shape[0] <= 8192):
        raise PackError(where, "tensors.router_centroid", f"shape {tuple(centroid.shape)}, expected [embedding_dim]",
                        "re-calibrate the pack")
    threshold = pack.hyperparameters.get("router_threshold", DEFAULT_THRESHOLD)
    if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not -1.0 <= threshold <= 1.0:
        raise PackError(where, "hyperparameters.router_threshold", f"must be a cosine in [-1, 1], got {threshold!r}",
                        f"set router_threshold (default {DEFAULT_THRESHOLD})")
