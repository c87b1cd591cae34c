"""Registry of erasure methods, so a pack can be validated without an ``isinstance`` ladder.

A method module (``erasekit/steering/<name>.py`` or ``erasekit/classifiers/<name>.py``) calls
:func:`register_method` at import time. Looking a method up imports ``<name>`` from those two
packages by convention, so adding a method touches exactly one file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from erasekit.errors import PackError

if TYPE_CHECKING:
    from erasekit.guardrails.pack import ConceptPack

_METHOD_PACKAGES = ("erasekit.steering", "erasekit.classifiers")


@dataclass(frozen=True)
class MethodSpec:
    """What erasekit needs to know about a method to trust one of its packs.

    ``validate`` checks method-specific invariants (tensor names and shapes, hyperparameter
    ranges) and raises :class:`PackError`; ``family`` says which integrations can run it
    (``"llm"`` for residual-stream methods, ``"diffusion"`` for diffusion pipelines).
    """

    name: str
    family: str
    validate: Callable[[ConceptPack, str], None]
    needs_classifier: bool = False


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register ``spec``; re-registering the same name replaces it (modules may be reloaded)."""
    if spec.family not in ("llm", "diffusion"):
        raise ValueError(f"MethodSpec.family must be 'llm' or 'diffusion', got {spec.family!r}")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str, where: str = "manifest.json") -> MethodSpec:
    """Return the registered method ``name``, importing its module on first use."""
    if name not in _REGISTRY and name.isidentifier():
        for package in _METHOD_PACKAGES:
            try:
                importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
                continue
            if name in _REGISTRY:
                break
    if name not in _REGISTRY:
        raise PackError(where, "method", f"unknown method {name!r}",
                        f"use one of {sorted(available_methods())} or upgrade erasekit")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    """Names of the methods registered so far (importing all known method modules first)."""
    for package in _METHOD_PACKAGES:
        try:
            pkg = importlib.import_module(package)
        except ModuleNotFoundError:
            continue
        import pkgutil

        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                try:
                    importlib.import_module(f"{package}.{info.name}")
                except ImportError:
                    continue
    return sorted(_REGISTRY)
