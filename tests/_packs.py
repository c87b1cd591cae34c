"""Helpers that build small, valid packs for tests, with a test-only registered method."""

from __future__ import annotations

import torch

from erasekit import Concept, ConceptPack, ModelFingerprint, PackError
from erasekit.guardrails.methods import MethodSpec, register_method


def _validate_vectors(pack: ConceptPack, where: str) -> None:
    for name, tensor in pack.tensors.items():
        if not name.startswith("vector."):
            raise PackError(where, f"tensors.{name}", "unexpected tensor", "only vector.<layer> tensors")
        if tensor.ndim != 1 or tensor.shape[0] != pack.fingerprint.hidden_size:
            raise PackError(where, f"tensors.{name}", f"shape {list(tensor.shape)} != [hidden_size]",
                            "re-calibrate for this model")


TEST_METHOD = register_method(MethodSpec(name="test_vectors", family="llm", validate=_validate_vectors))

FINGERPRINT = ModelFingerprint(
    architecture="LlamaForCausalLM", hidden_size=8, num_layers=2, vocab_size=32, embedding_sha256="ab" * 32
)


def make_pack(name: str = "harry_potter", seed: int = 0, fingerprint: ModelFingerprint = FINGERPRINT) -> ConceptPack:
    gen = torch.Generator().manual_seed(seed)
    return ConceptPack(
        concept=Concept(name, forget=("Who is Harry Potter's best friend?",), retain=("What is 2+2?",)),
        method="test_vectors",
        fingerprint=fingerprint,
        tensors={f"vector.{i}": torch.randn(fingerprint.hidden_size, generator=gen) for i in range(2)},
        hyperparameters={"strength": 0.5, "layers": [0, 1]},
    )
