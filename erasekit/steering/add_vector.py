"""``add_vector``: a constant steering (control / CAA) vector per layer, as a registered method.

Why a method of its own: it is the simplest residual edit whose effect is exactly predictable
(``h + scale * v`` on the active rows), which makes it the reference for checking that a
framework adapter routes rows, phases and layers correctly, and it is what users of
repeng / steering-vectors already have on disk. Packs hold one ``vector.<layer>`` tensor of
shape ``[hidden_size]`` per edited decoder layer (the output of that layer is edited).

Hyperparameters: ``scale`` (float, default 1.0) and ``phases`` (subset of
``["prefill", "decode"]``, default both).
"""

from __future__ import annotations

import math

import torch

from erasekit.errors import PackError
from erasekit.guardrails.methods import MethodSpec, register_method
from erasekit.guardrails.pack import ConceptPack
from erasekit.steering.residual import AddVector, Phase, ResidualEdit, register_edit_factory

METHOD = "add_vector"
_PHASE_NAMES = {p.value for p in Phase}


def _layer_of(name: str, where: str, num_layers: int) -> int:
    prefix, _, index = name.partition(".")
    if prefix != "vector" or not index.isdigit():
        raise PackError(where, f"tensors.{name}", "unexpected tensor name", "name tensors vector.<layer index>")
    layer = int(index)
    if layer >= num_layers:
        raise PackError(where, f"tensors.{name}", f"layer {layer} >= the model's {num_layers} layers",
                        "use a pack made for this model")
    return layer


def _validate(pack: ConceptPack, where: str) -> None:
    if not pack.tensors:
        raise PackError(where, "tensors", "no vectors", "store at least one vector.<layer> tensor")
    for name, tensor in pack.tensors.items():
        _layer_of(name, where, pack.fingerprint.num_layers)
        if not tensor.is_floating_point() or tensor.ndim != 1 or tensor.shape[0] != pack.fingerprint.hidden_size:
            raise PackError(where, f"tensors.{name}",
                            f"expected a float vector of shape [{pack.fingerprint.hidden_size}], "
                            f"got {tensor.dtype} {list(tensor.shape)}", "re-create the pack for this model")
    hp = pack.hyperparameters
    unknown = sorted(set(hp) - {"scale", "phases"})
    if unknown:
        raise PackError(where, f"hyperparameters.{unknown[0]}", "unknown hyperparameter", "use only scale and phases")
    scale = hp.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise PackError(where, "hyperparameters.scale", f"expected a finite number, got {scale!r}", "set scale: 1.0")
    phases = hp.get("phases", sorted(_PHASE_NAMES))
    if (not isinstance(phases, list) or not phases or len(set(phases)) != len(phases)
            or not set(phases) <= _PHASE_NAMES):
        raise PackError(where, "hyperparameters.phases", f"expected a non-empty subset of {sorted(_PHASE_NAMES)}",
                        "set phases: [prefill, decode]")


def edit_from_add_vector_pack(pack: ConceptPack) -> ResidualEdit:
    """``AddVector`` with the pack's vectors pre-multiplied by ``scale``."""
    scale = float(pack.hyperparameters.get("scale", 1.0))
    phases = frozenset(Phase(p) for p in pack.hyperparameters.get("phases", sorted(_PHASE_NAMES)))
    vectors = {int(name.split(".")[1]): t.to(torch.float32) * scale for name, t in pack.tensors.items()}
    return AddVector(pack.name, vectors, phases)


def make_add_vector_pack(
    concept, fingerprint, vectors: dict[int, torch.Tensor], scale: float = 1.0, phases: list[str] | None = None
) -> ConceptPack:
    """Build (and validate) an ``add_vector`` pack from ``{layer: vector}``."""
    hp: dict[str, object] = {"scale": float(scale)}
    if phases is not None:
        hp["phases"] = list(phases)
    pack = ConceptPack(concept=concept, method=METHOD, fingerprint=fingerprint,
                       tensors={f"vector.{k}": v.detach().to("cpu", torch.float32).contiguous()
                                for k, v in sorted(vectors.items())},
                       hyperparameters=hp)
    pack.validate()
    return pack


register_method(MethodSpec(name=METHOD, family="llm", validate=_validate))
register_edit_factory(METHOD, edit_from_add_vector_pack)
