import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from erasekit import ConceptPack, ModelFingerprint, PackError
from erasekit.guardrails.pack import CLASSIFIER_NAME, MANIFEST_NAME, TENSORS_NAME

from ._packs import FINGERPRINT, make_pack


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return make_pack().save_pretrained(tmp_path / "pack")


def _rewrite_manifest(pack_dir: Path, **changes) -> None:
    manifest = json.loads((pack_dir / MANIFEST_NAME).read_text())
    manifest.update(changes)
    (pack_dir / MANIFEST_NAME).write_text(json.dumps(manifest))


def _rewrite_tensors(pack_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the tensors file and update the manifest so only the content is wrong."""
    import hashlib

    save_file(tensors, str(pack_dir / TENSORS_NAME))
    blob = (pack_dir / TENSORS_NAME).read_bytes()
    manifest = json.loads((pack_dir / MANIFEST_NAME).read_text())
    manifest["files"][TENSORS_NAME] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    manifest["tensors"] = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                           for k, v in tensors.items()}
    (pack_dir / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_round_trip_is_bit_exact(saved: Path) -> None:
    original = make_pack()
    loaded = ConceptPack.from_pretrained(saved)
    assert loaded.name == "harry_potter" and loaded.method == "test_vectors"
    assert loaded.fingerprint == original.fingerprint
    assert loaded.hyperparameters == original.hyperparameters
    assert loaded.concept == original.concept
    assert set(loaded.tensors) == set(original.tensors)
    for k, v in original.tensors.items():
        assert loaded.tensors[k].dtype == v.dtype
        assert torch.equal(loaded.tensors[k], v)
    assert sorted(p.name for p in saved.iterdir()) == [MANIFEST_NAME, TENSORS_NAME]


def test_classifier_bytes_round_trip(tmp_path: Path) -> None:
    pack = make_pack()
    pack.classifier_onnx = b"\x08\x07onnx-bytes"
    loaded = ConceptPack.from_pretrained(pack.save_pretrained(tmp_path / "p"))
    assert loaded.classifier_onnx == b"\x08\x07onnx-bytes"


def test_wrong_fingerprint_refused(saved: Path) -> None:
    other = ModelFingerprint(**{**FINGERPRINT.to_dict(), "embedding_sha256": "cd" * 32})
    with pytest.raises(PackError, match="embedding_sha256") as info:
        ConceptPack.from_pretrained(saved, model=other)
    assert "Fix:" in str(info.value)
    bigger = ModelFingerprint(**{**FINGERPRINT.to_dict(), "num_layers": 30})
    with pytest.raises(PackError, match="num_layers"):
        ConceptPack.from_pretrained(saved, model=bigger)
    ConceptPack.from_pretrained(saved, model=FINGERPRINT)  # the right model loads


def test_fingerprint_of_real_model_changes_with_weights() -> None:
    transformers = pytest.importorskip("transformers")
    from erasekit import fingerprint_model

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=1, num_key_value_heads=1, vocab_size=100)
    torch.manual_seed(0)
    a = transformers.LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    b = transformers.LlamaForCausalLM(cfg)
    fa, fb = fingerprint_model(a), fingerprint_model(b)
    assert (fa.hidden_size, fa.num_layers, fa.vocab_size) == (64, 2, 100)
    assert fa.embedding_sha256 != fb.embedding_sha256
    assert fingerprint_model(a.to(torch.bfloat16)) == fa  # served dtype does not matter


def test_truncated_safetensors_refused(saved: Path) -> None:
    blob = (saved / TENSORS_NAME).read_bytes()
    (saved / TENSORS_NAME).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(PackError, match="truncated"):
        ConceptPack.from_pretrained(saved)


def test_truncated_safetensors_with_matching_manifest_refused(saved: Path) -> None:
    import hashlib

    blob = (saved / TENSORS_NAME).read_bytes()[:40]
    (saved / TENSORS_NAME).write_bytes(blob)
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    manifest["files"][TENSORS_NAME] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    (saved / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(PackError, match="safetensors"):
        ConceptPack.from_pretrained(saved)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor_refused(saved: Path, bad: float) -> None:
    t = torch.zeros(8)
    t[3] = bad
    _rewrite_tensors(saved, {"vector.0": t, "vector.1": torch.zeros(8)})
    with pytest.raises(PackError, match="NaN or inf"):
        ConceptPack.from_pretrained(saved)


def test_non_finite_refused_at_save(tmp_path: Path) -> None:
    pack = make_pack()
    pack.tensors["vector.0"][0] = float("nan")
    with pytest.raises(PackError, match="NaN or inf"):
        pack.save_pretrained(tmp_path / "p")
    assert not (tmp_path / "p" / MANIFEST_NAME).exists()


def test_nan_hyperparameter_in_manifest_refused(saved: Path) -> None:
    text = (saved / MANIFEST_NAME).read_text().replace('"strength": 0.5', '"strength": NaN')
    (saved / MANIFEST_NAME).write_text(text)
    with pytest.raises(PackError, match="NaN"):
        ConceptPack.from_pretrained(saved)


def test_unknown_format_version_refused(saved: Path) -> None:
    _rewrite_manifest(saved, format_version=99)
    with pytest.raises(PackError, match="format_version"):
        ConceptPack.from_pretrained(saved)


@pytest.mark.parametrize("member", [MANIFEST_NAME, TENSORS_NAME])
def test_missing_file_refused(saved: Path, member: str) -> None:
    (saved / member).unlink()
    with pytest.raises(PackError, match="missing file"):
        ConceptPack.from_pretrained(saved)


def test_missing_classifier_refused(tmp_path: Path) -> None:
    pack = make_pack()
    pack.classifier_onnx = b"x"
    out = pack.save_pretrained(tmp_path / "p")
    (out / CLASSIFIER_NAME).unlink()
    with pytest.raises(PackError, match="classifier.onnx"):
        ConceptPack.from_pretrained(out)


def test_missing_directory_refused(tmp_path: Path) -> None:
    with pytest.raises(PackError, match="does not exist"):
        ConceptPack.from_pretrained(tmp_path / "nope")


def test_pickle_in_folder_is_never_loaded(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Bomb:
        def __reduce__(self):
            return (Path.touch, (saved / "EXPLODED",))

    (saved / "tensors.pkl").write_bytes(pickle.dumps(Bomb()))
    (saved / "model.bin").write_bytes(pickle.dumps(Bomb()))
    calls = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    pack = ConceptPack.from_pretrained(saved)
    assert pack.name == "harry_potter"
    assert calls == [] and not (saved / "EXPLODED").exists()


def test_wrong_shape_refused_by_method(saved: Path) -> None:
    _rewrite_tensors(saved, {"vector.0": torch.zeros(5), "vector.1": torch.zeros(8)})
    with pytest.raises(PackError, match="hidden_size"):
        ConceptPack.from_pretrained(saved)


def test_manifest_shape_mismatch_refused(saved: Path) -> None:
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    manifest["tensors"]["vector.0"]["shape"] = [9]
    (saved / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(PackError, match="shape"):
        ConceptPack.from_pretrained(saved)


def test_manifest_dtype_mismatch_refused(saved: Path) -> None:
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    manifest["tensors"]["vector.0"]["dtype"] = "float16"
    (saved / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(PackError, match="dtype"):
        ConceptPack.from_pretrained(saved)


def test_unknown_method_refused(saved: Path) -> None:
    _rewrite_manifest(saved, method="no_such_method")
    with pytest.raises(PackError, match="unknown method"):
        ConceptPack.from_pretrained(saved)


def test_unknown_manifest_field_refused(saved: Path) -> None:
    _rewrite_manifest(saved, surprise=1)
    with pytest.raises(PackError, match="surprise"):
        ConceptPack.from_pretrained(saved)


def test_symlinked_member_refused(saved: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    shutil.move(saved / TENSORS_NAME, outside)
    (saved / TENSORS_NAME).symlink_to(outside)
    with pytest.raises(PackError, match="symbolic link"):
        ConceptPack.from_pretrained(saved)


def test_changed_file_refused(saved: Path) -> None:
    blob = bytearray((saved / TENSORS_NAME).read_bytes())
    blob[-1] ^= 0xFF
    (saved / TENSORS_NAME).write_bytes(bytes(blob))
    with pytest.raises(PackError, match="SHA-256"):
        ConceptPack.from_pretrained(saved)


def test_cli_info_prints_and_validates(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from erasekit.cli import main

    assert main(["info", str(saved)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["concept"] == "harry_potter"
    _rewrite_manifest(saved, format_version=2)
    assert main(["info", str(saved)]) == 2
    assert "format_version" in capsys.readouterr().err
