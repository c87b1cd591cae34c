"""CGCE packs: what a calibrated classifier holds and how it is checked and loaded.

A ``cgce`` pack is one concept for one generator's conditioning (one set of text encoders).
It stores the ONNX detector (``classifier.onnx``: raw conditioning -> P(concept)), the torch
twin's folded weights, and the concept embedding the features attend with. Hyperparameters:

* ``seq_len``, ``embed_dim``: the conditioning shape the classifier reads (checked at attach);
* ``tau``: feature temperature; ``threshold``: detection cut on P(concept);
* ``eta``, ``max_steps``, ``target``: refinement step size (paper default 1.0), step cap and
  the probability refinement must reach (``<= threshold``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from erasekit.classifiers.detector import OnnxDetector
from erasekit.classifiers.features import num_features
from erasekit.classifiers.twin import TorchTwin
from erasekit.errors import PackError
from erasekit.guardrails.methods import MethodSpec, register_method

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

    from erasekit.guardrails.pack import ConceptPack

METHOD = "cgce"
DEFAULTS: dict[str, float | int] = {"tau": 0.1, "threshold": 0.5, "eta": 1.0, "max_steps": 100, "target": 0.01}
_TENSORS = ("concept_embedding", "twin_weight", "twin_bias")


def _number(hp: dict, key: str, where: str, lo: float, hi: float, integer: bool = False) -> float:
    value = hp.get(key)
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise PackError(where, f"hyperparameters.{key}", f"must be {kind} in [{lo}, {hi}], got {value!r}",
                        f"re-calibrate, or pass --set {key}=VALUE within range")
    return value


def validate(pack: ConceptPack, where: str) -> None:
    hp = pack.hyperparameters
    seq_len = int(_number(hp, "seq_len", where, 1, 4096, integer=True))
    dim = int(_number(hp, "embed_dim", where, 1, 65536, integer=True))
    _number(hp, "tau", where, 1e-3, 10.0)
    threshold = _number(hp, "threshold", where, 1e-4, 1 - 1e-4)
    target = _number(hp, "target", where, 1e-4, 1 - 1e-4)
    _number(hp, "eta", where, 0.0, 1e4)
    _number(hp, "max_steps", where, 0, 10000, integer=True)
    if target > threshold:
        raise PackError(where, "hyperparameters.target", f"target {target} above threshold {threshold}",
                        "refinement must end under the detection threshold: set target <= threshold")
    names = set(pack.tensors)
    if names != set(_TENSORS):
        raise PackError(where, "tensors", f"expected tensors {sorted(_TENSORS)}, got {sorted(names)}",
                        "re-calibrate the pack with `erasekit calibrate --method cgce`")
    concept = pack.tensors["concept_embedding"]
    if concept.ndim != 2 or concept.shape[1] != dim or concept.shape[0] < 1:
        raise PackError(where, "tensors.concept_embedding", f"shape {list(concept.shape)} is not [K, {dim}]",
                        "re-calibrate the pack")
    if list(pack.tensors["twin_weight"].shape) != [num_features(dim)]:
        raise PackError(where, "tensors.twin_weight", f"shape {list(pack.tensors['twin_weight'].shape)} is not "
                        f"[{num_features(dim)}]", "re-calibrate the pack")
    if list(pack.tensors["twin_bias"].shape) != [1]:
        raise PackError(where, "tensors.twin_bias", "must have shape [1]", "re-calibrate the pack")
    del seq_len


register_method(MethodSpec(name=METHOD, family="diffusion", validate=validate, needs_classifier=True))


@dataclass
class CGCEClassifier:
    """A loaded ``cgce`` pack, ready to detect (ONNX) and refine (torch twin)."""

    concept: str
    detector: OnnxDetector
    twin: TorchTwin
    seq_len: int
    embed_dim: int
    threshold: float
    target: float
    eta: float
    max_steps: int

    @classmethod
    def from_pack(cls, pack: ConceptPack) -> CGCEClassifier:
        hp = pack.hyperparameters
        where = str(pack.source or f"pack {pack.name!r}")
        seq_len, dim = int(hp["seq_len"]), int(hp["embed_dim"])
        twin = TorchTwin(
            concept=pack.tensors["concept_embedding"].float(),
            weight=pack.tensors["twin_weight"].float(),
            bias=pack.tensors["twin_bias"].float(),
            tau=float(hp["tau"]),
        )
        return cls(
            concept=pack.name,
            detector=OnnxDetector(pack.classifier_onnx or b"", seq_len, dim, where=f"{where}/classifier.onnx"),
            twin=twin,
            seq_len=seq_len,
            embed_dim=dim,
            threshold=float(hp["threshold"]),
            target=float(hp["target"]),
            eta=float(hp["eta"]),
            max_steps=int(hp["max_steps"]),
        )

    def scores(self, embeds: torch.Tensor) -> np.ndarray:
        """P(concept) per row of conditioning ``[N, T, D]``, from the ONNX detector."""
        return self.detector.predict_proba(embeds.detach().to("cpu", torch.float32).numpy())


def pack_tensors_from_detector(detector: Pipeline) -> dict[str, torch.Tensor]:
    """The tensors a ``cgce`` pack stores for a fitted detector."""
    twin = TorchTwin.from_detector(detector)
    return {"concept_embedding": twin.concept, "twin_weight": twin.weight, "twin_bias": twin.bias}
