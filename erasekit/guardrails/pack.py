"""Concept packs: one calibrated concept, for one model, for one method, on disk.

A pack is a directory an operator can read, diff and audit::

    manifest.json         format version, concept, method, hyperparameters, model fingerprint,
                          erasekit version, creation time, and per-file SHA-256 + tensor specs
    tensors.safetensors   the calibrated tensors (never pickle)
    classifier.onnx       only for methods that ship a classifier

Loading trusts nothing: the manifest schema, the file hashes, every tensor's name, dtype and
shape, finiteness, the method's own invariants and, when a model is given, its fingerprint are
checked before a single hook is attached. Files other than these three are never opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from erasekit import __version__
from erasekit.errors import PackError
from erasekit.guardrails.concept import Concept
from erasekit.guardrails.fingerprint import ModelFingerprint, fingerprint_model
from erasekit.guardrails.methods import MethodSpec, get_method

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TENSORS_NAME = "tensors.safetensors"
CLASSIFIER_NAME = "classifier.onnx"

#: Upper bounds that turn a hostile or corrupt pack into an error instead of an OOM.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_TENSOR_ELEMENTS = 1 << 31
MAX_FILE_BYTES = 8 * 1024**3

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_MANIFEST_FIELDS = {
    "format_version", "concept", "method", "hyperparameters", "model_fingerprint",
    "erasekit_version", "created_at", "tensors", "files",
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_safe(value: Any, where: str, path: str) -> None:
    """Reject hyperparameters JSON cannot round-trip (NaN, inf, objects)."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PackError(where, path, f"non-finite number {value}", "use finite hyperparameters")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _json_safe(item, where, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise PackError(where, path, f"non-string key {key!r}", "use string keys")
            _json_safe(item, where, f"{path}.{key}")
        return
    raise PackError(where, path, f"{type(value).__name__} is not JSON data",
                    "store only numbers, strings, booleans, lists and dicts")


@dataclass
class ConceptPack:
    """A calibrated concept, ready to attach to the model it was calibrated on.

    ``tensors`` hold the method's calibrated state (directions, projector factors, classifier
    weights); ``hyperparameters`` hold everything else the method needs at inference time.
    """

    concept: Concept
    method: str
    fingerprint: ModelFingerprint
    tensors: dict[str, torch.Tensor]
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    classifier_onnx: bytes | None = None
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    erasekit_version: str = __version__
    source: Path | None = None

    @property
    def name(self) -> str:
        """The concept name, which is how policies and requests refer to this pack."""
        return self.concept.name

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method, where=str(self.source or "ConceptPack"))

    def validate(self, where: str | None = None) -> None:
        """Check tensors, hyperparameters and method invariants; raise :class:`PackError`."""
        where = where or str(self.source or "ConceptPack")
        spec = self.spec
        _json_safe(self.hyperparameters, where, "hyperparameters")
        for name, tensor in self.tensors.items():
            if not isinstance(name, str) or not name:
                raise PackError(where, "tensors", f"bad tensor name {name!r}", "use non-empty string names")
            if not isinstance(tensor, torch.Tensor):
                raise PackError(where, f"tensors.{name}", "not a torch.Tensor", "store tensors only")
            if tensor.dtype not in _DTYPE_NAMES:
                raise PackError(where, f"tensors.{name}", f"unsupported dtype {tensor.dtype}",
                                f"use one of {sorted(_DTYPES)}")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise PackError(where, f"tensors.{name}", "contains NaN or inf",
                                "re-calibrate; check the calibration prompts produce finite activations")
        if spec.needs_classifier and not self.classifier_onnx:
            raise PackError(where, CLASSIFIER_NAME, f"method {self.method!r} needs a classifier",
                            "re-calibrate the pack so it includes classifier.onnx")
        spec.validate(self, where)

    def check_model(self, model: torch.nn.Module | ModelFingerprint) -> None:
        """Refuse a model this pack was not calibrated on."""
        actual = model if isinstance(model, ModelFingerprint) else fingerprint_model(model)
        self.fingerprint.check_matches(actual, str(self.source or f"pack {self.name!r}"))

    # ------------------------------------------------------------------ disk format
    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the pack to ``directory`` (created if needed) and return its path."""
        self.validate()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        blob = save_safetensors_bytes(tensors) if tensors else save_safetensors_bytes({})
        files = {TENSORS_NAME: {"sha256": _sha256(blob), "bytes": len(blob)}}
        if self.classifier_onnx is not None:
            files[CLASSIFIER_NAME] = {"sha256": _sha256(self.classifier_onnx), "bytes": len(self.classifier_onnx)}
        manifest = {
            "format_version": FORMAT_VERSION,
            "concept": self.concept.to_dict(),
            "method": self.method,
            "hyperparameters": self.hyperparameters,
            "model_fingerprint": self.fingerprint.to_dict(),
            "erasekit_version": self.erasekit_version,
            "created_at": self.created_at,
            "tensors": {k: {"dtype": _DTYPE_NAMES[v.dtype], "shape": list(v.shape)} for k, v in tensors.items()},
            "files": files,
        }
        # Write data first and the manifest last, each atomically, so a reader never sees a
        # manifest that points at half-written tensors.
        _atomic_write(out / TENSORS_NAME, blob)
        if self.classifier_onnx is not None:
            _atomic_write(out / CLASSIFIER_NAME, self.classifier_onnx)
        _atomic_write(out / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True).encode())
        self.source = out
        return out

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        model: torch.nn.Module | ModelFingerprint | None = None,
        device: str | torch.device | None = None,
    ) -> ConceptPack:
        """Load and fully validate a pack; with ``model``, also check it was made for it."""
        root = Path(directory)
        where = str(root)
        if not root.exists():
            raise PackError(where, None, "pack directory does not exist", "check the path, or calibrate a pack first")
        if not root.is_dir():
            raise PackError(where, None, "not a directory", "point at the pack directory, not a file inside it")
        manifest = _read_manifest(root)
        concept = _parse_concept(manifest, root)
        method = manifest["method"]
        fingerprint = ModelFingerprint.from_dict(manifest["model_fingerprint"], str(root / MANIFEST_NAME))
        files = _parse_files(manifest, root)
        blob = _read_member(root, TENSORS_NAME, files)
        tensors = _load_tensors(blob, manifest, root)
        onnx = _read_member(root, CLASSIFIER_NAME, files) if CLASSIFIER_NAME in files else None
        pack = cls(
            concept=concept,
            method=method,
            fingerprint=fingerprint,
            tensors=tensors,
            hyperparameters=manifest["hyperparameters"],
            classifier_onnx=onnx,
            created_at=manifest["created_at"],
            erasekit_version=manifest["erasekit_version"],
            source=root,
        )
        pack.validate(where)
        if model is not None:
            pack.check_model(model)
        if device is not None:
            pack.tensors = {k: v.to(device) for k, v in pack.tensors.items()}
        return pack

    def manifest_summary(self) -> dict[str, Any]:
        """What `erasekit info` prints: everything but the tensor data."""
        return {
            "concept": self.concept.name,
            "method": self.method,
            "hyperparameters": self.hyperparameters,
            "model_fingerprint": self.fingerprint.to_dict(),
            "tensors": {k: {"dtype": _DTYPE_NAMES[v.dtype], "shape": list(v.shape)} for k, v in self.tensors.items()},
            "classifier_onnx_bytes": len(self.classifier_onnx) if self.classifier_onnx else 0,
            "erasekit_version": self.erasekit_version,
            "created_at": self.created_at,
            "forget_examples": len(self.concept.forget),
            "retain_examples": len(self.concept.retain),
        }


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _member_path(root: Path, name: str) -> Path:
    """Path of a pack member, refusing links and anything that resolves outside the pack."""
    path = root / name
    where = str(path)
    if path.is_symlink():
        raise PackError(where, None, "pack files must not be symbolic links",
                        "copy the real file into the pack directory")
    resolved_root = root.resolve()
    try:
        path.resolve().relative_to(resolved_root)
    except ValueError:
        raise PackError(where, None, "file resolves outside the pack directory",
                        "copy the real file into the pack directory") from None
    if not path.exists():
        raise PackError(where, None, "missing file", f"restore {name} or re-calibrate the pack")
    if not path.is_file():
        raise PackError(where, None, "not a regular file", f"{name} must be a file")
    return path


def _read_manifest(root: Path) -> dict[str, Any]:
    path = _member_path(root, MANIFEST_NAME)
    where = str(path)
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise PackError(where, None, "manifest larger than 16 MiB", "this is not an erasekit manifest")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except PackError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PackError(where, None, f"not valid UTF-8 JSON ({exc.__class__.__name__}: {str(exc)[:120]})",
                        "restore the manifest from the original pack or re-calibrate") from None
    if not isinstance(manifest, dict):
        raise PackError(where, None, "manifest must be a JSON object", "re-calibrate the pack")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        raise PackError(where, "format_version", f"unsupported format version {version!r} (this erasekit reads {FORMAT_VERSION})",
                        "upgrade erasekit, or re-calibrate the pack with this version")
    unknown = sorted(set(manifest) - _MANIFEST_FIELDS)
    if unknown:
        raise PackError(where, unknown[0], "unknown manifest field",
                        f"format {FORMAT_VERSION} has only {sorted(_MANIFEST_FIELDS)}; re-calibrate the pack")
    missing = sorted(_MANIFEST_FIELDS - set(manifest))
    if missing:
        raise PackError(where, missing[0], "missing manifest field", "re-calibrate the pack")
    for key, typ in (("method", str), ("erasekit_version", str), ("created_at", str),
                     ("hyperparameters", dict), ("tensors", dict), ("files", dict), ("concept", dict)):
        if not isinstance(manifest[key], typ):
            raise PackError(where, key, f"expected {typ.__name__}, got {type(manifest[key]).__name__}",
                            "re-calibrate the pack")
    _json_safe(manifest["hyperparameters"], where, "hyperparameters")
    return manifest


def _reject_constant(name: str) -> Any:
    raise PackError(MANIFEST_NAME, None, f"JSON constant {name} is not allowed", "use finite numbers")


def _parse_concept(manifest: dict[str, Any], root: Path) -> Concept:
    try:
        return Concept.from_dict(manifest["concept"])
    except PackError:
        raise
    except (ValueError, TypeError) as exc:
        raise PackError(str(root / MANIFEST_NAME), "concept", str(exc), "re-calibrate the pack") from None


def _parse_files(manifest: dict[str, Any], root: Path) -> dict[str, dict[str, Any]]:
    where = str(root / MANIFEST_NAME)
    files = manifest["files"]
    allowed = {TENSORS_NAME, CLASSIFIER_NAME}
    for name, info in files.items():
        if name not in allowed:
            raise PackError(where, f"files.{name}", "unknown pack member",
                            f"a pack holds only {sorted(allowed)}; re-calibrate the pack")
        if (not isinstance(info, dict) or set(info) != {"sha256", "bytes"}
                or not isinstance(info["sha256"], str) or not isinstance(info["bytes"], int)
                or isinstance(info["bytes"], bool) or not 0 <= info["bytes"] <= MAX_FILE_BYTES):
            raise PackError(where, f"files.{name}", "expected {'sha256': str, 'bytes': int}", "re-calibrate the pack")
    if TENSORS_NAME not in files:
        raise PackError(where, f"files.{TENSORS_NAME}", "missing", "re-calibrate the pack")
    return files


def _read_member(root: Path, name: str, files: dict[str, dict[str, Any]]) -> bytes:
    path = _member_path(root, name)
    expected = files[name]
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise PackError(str(path), None, f"size {size} bytes, manifest says {expected['bytes']} (truncated or replaced)",
                        "restore the file from the original pack or re-calibrate")
    data = path.read_bytes()
    if _sha256(data) != expected["sha256"]:
        raise PackError(str(path), None, "SHA-256 does not match the manifest (file changed or corrupt)",
                        "restore the file from the original pack or re-calibrate")
    return data


def _load_tensors(blob: bytes, manifest: dict[str, Any], root: Path) -> dict[str, torch.Tensor]:
    where = str(root / TENSORS_NAME)
    mwhere = str(root / MANIFEST_NAME)
    specs = manifest["tensors"]
    for name, spec in specs.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape"}:
            raise PackError(mwhere, f"tensors.{name}", "expected {'dtype': str, 'shape': [int, ...]}", "re-calibrate the pack")
        if not isinstance(spec["dtype"], str) or spec["dtype"] not in _DTYPES:
            raise PackError(mwhere, f"tensors.{name}.dtype", f"unsupported dtype {str(spec['dtype'])[:40]!r}",
                            f"use one of {sorted(_DTYPES)}")
        shape = spec["shape"]
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape)):
            raise PackError(mwhere, f"tensors.{name}.shape", f"bad shape {str(shape)[:80]}", "re-calibrate the pack")
        if math.prod(shape) > MAX_TENSOR_ELEMENTS:
            raise PackError(mwhere, f"tensors.{name}.shape", f"{math.prod(shape)} elements exceeds the limit",
                            "packs hold calibration tensors, not model weights")
    try:
        tensors = load_safetensors_bytes(blob)
    except Exception as exc:  # safetensors raises its own error types; all mean "corrupt"
        raise PackError(where, None, f"not a readable safetensors file ({str(exc)[:120]})",
                        "restore the file from the original pack or re-calibrate") from None
    if set(tensors) != set(specs):
        diff = sorted(set(tensors) ^ set(specs))
        raise PackError(where, f"tensors.{diff[0]}", "tensor names differ from the manifest", "re-calibrate the pack")
    for name, tensor in tensors.items():
        spec = specs[name]
        if tensor.dtype != _DTYPES[spec["dtype"]]:
            raise PackError(where, f"tensors.{name}", f"dtype {tensor.dtype} but manifest says {spec['dtype']}",
                            "re-calibrate the pack")
        if list(tensor.shape) != spec["shape"]:
            raise PackError(where, f"tensors.{name}", f"shape {list(tensor.shape)} but manifest says {spec['shape']}",
                            "re-calibrate the pack")
    return tensors
