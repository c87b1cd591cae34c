"""``erasekit.guard`` and ``erasekit.calibrate``: one entry point, dispatched by model type.

Why a dispatcher: users hold a transformers model or a diffusers pipeline and should not have
to know which adapter module serves it. The dispatcher knows framework *families* only (by the
module an object's class comes from); it never knows methods, so a new method does not touch it.
"""

from __future__ import annotations

import importlib
from typing import Any

from erasekit.errors import ErasekitError

#: framework family -> (adapter module for guard, adapter module for calibrate)
_ADAPTERS = {
    "transformers": ("erasekit.integrations.transformers", "erasekit.integrations.transformers_calibrate"),
    "diffusers": ("erasekit.integrations.diffusers", "erasekit.integrations.diffusers_calibrate"),
}


def _family(obj: object) -> str:
    for cls in type(obj).__mro__:
        root = cls.__module__.split(".", 1)[0]
        if root in _ADAPTERS:
            return root
    raise ErasekitError("guard", "model", f"{type(obj).__name__} is neither a transformers model nor a diffusers pipeline",
                        "pass a transformers PreTrainedModel or a diffusers DiffusionPipeline")


def _adapter(obj: object, which: int) -> Any:
    family = _family(obj)
    name = _ADAPTERS[family][which]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise ErasekitError("guard", "model", f"the {family} adapter ({name}) is not installed in this build",
                            "upgrade erasekit") from None


def guard(model: Any, packs: Any = None, **kwargs: Any) -> Any:
    """Attach concept packs to ``model`` (transformers model or diffusers pipeline).

    Returns the framework's guard object: a context manager with ``detach()``; for transformers
    :class:`erasekit.integrations.transformers.TransformersGuard` (``generate(..., erase=...)``).
    """
    module = _adapter(model, 0)
    if hasattr(module, "guard"):
        return module.guard(model, packs, **kwargs)
    return module.TransformersGuard(model, packs, **kwargs)


def calibrate(model: Any, concept: Any, method: str | None = None, **kwargs: Any) -> Any:
    """Calibrate ``concept`` for ``model`` and return a :class:`ConceptPack` (not yet saved)."""
    module = _adapter(model, 1)
    if method is None:
        return module.calibrate(model, concept, **kwargs)
    return module.calibrate(model, concept, method, **kwargs)
