"""Which model a pack was calibrated on.

A steering direction computed on one model is noise on another, and applying it silently is
the worst outcome. The fingerprint is cheap to compute at attach time and robust to the
dtype the model is served in: the embedding slice is rounded to bfloat16 before hashing, so a
pack calibrated on an fp32 copy still matches the bf16 checkpoint served by vLLM.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import torch

from erasekit.errors import PackError

#: Rows of the input-embedding matrix that enter the hash. Enough to tell any two trained
#: checkpoints apart, small enough to hash in microseconds.
FINGERPRINT_ROWS = 64


def hash_embedding_slice(weight: torch.Tensor, rows: int = FINGERPRINT_ROWS) -> str:
    """SHA-256 of the first ``rows`` rows of an embedding matrix, rounded to bfloat16."""
    block = weight.detach()[:rows].to(device="cpu", dtype=torch.bfloat16).contiguous()
    return hashlib.sha256(block.view(torch.int16).numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of the model (or text encoder) a pack belongs to."""

    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    embedding_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, where: str = "manifest.json") -> ModelFingerprint:
        if not isinstance(data, dict):
            raise PackError(where, "model_fingerprint", "expected a JSON object", "re-calibrate the pack")
        types = {"architecture": str, "hidden_size": int, "num_layers": int, "vocab_size": int,
                 "embedding_sha256": str}
        extra = sorted(set(data) - set(types))
        if extra:
            raise PackError(where, f"model_fingerprint.{extra[0]}", "unknown field",
                            f"fingerprints hold only {sorted(types)}; re-calibrate the pack")
        for key, typ in types.items():
            value = data.get(key)
            if not isinstance(value, typ) or isinstance(value, bool):
                raise PackError(where, f"model_fingerprint.{key}",
                                f"expected {typ.__name__}, got {type(value).__name__}",
                                "re-calibrate the pack with `erasekit calibrate`")
            if typ is int and value < 0:
                raise PackError(where, f"model_fingerprint.{key}", "must be >= 0", "re-calibrate the pack")
        return cls(**data)

    def check_matches(self, actual: ModelFingerprint, where: str) -> None:
        """Raise :class:`PackError` naming the first field where the model differs."""
        for key in ("architecture", "hidden_size", "num_layers", "vocab_size", "embedding_sha256"):
            want, got = getattr(self, key), getattr(actual, key)
            if want != got:
                raise PackError(
                    where, f"model_fingerprint.{key}",
                    f"pack was calibrated for {key}={want!r} but the model has {got!r}",
                    "use a pack calibrated on this exact model (run `erasekit calibrate` against it)",
                )


def fingerprint_model(model: torch.nn.Module) -> ModelFingerprint:
    """Fingerprint a transformers model (causal LM, multimodal LM or text encoder).

    Multimodal models are fingerprinted by their language model, since that is where the
    residual-stream hooks act.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_input_embeddings"):
        raise PackError(
            type(model).__name__, None, "not a transformers model (no .config / .get_input_embeddings())",
            "pass a transformers PreTrainedModel, or build a ModelFingerprint by hand",
        )
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    embedding = model.get_input_embeddings()
    return ModelFingerprint(
        architecture=str(architectures[0]),
        hidden_size=int(text_config.hidden_size),
        num_layers=int(getattr(text_config, "num_hidden_layers", 0)),
        vocab_size=int(text_config.vocab_size),
        embedding_sha256=hash_embedding_slice(embedding.weight),
    )
