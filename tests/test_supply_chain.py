"""Packs and models are data, never code: no unpickling anywhere in erasekit or its benchmarks."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = [ROOT / "erasekit", ROOT / "benchmarks"]
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _python_files() -> list[Path]:
    return sorted(p for d in SCANNED if d.exists() for p in d.rglob("*.py"))


def _violations(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if func.endswith("torch.load"):
                if kwargs.get("weights_only") != "True":
                    found.append(f"{func}(...) without weights_only=True")
            if func.endswith(("np.load", "numpy.load")) and kwargs.get("allow_pickle") == "True":
                found.append(f"{func}(allow_pickle=True)")
            if func.endswith("from_pretrained") and kwargs.get("use_safetensors") == "False":
                found.append(f"{func}(use_safetensors=False)")
    return [f"{path.relative_to(root)}:{v}" for v in found]


def test_scanner_catches_violations(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch\ntorch.load('x')\nimport numpy as np\nnp.load('y', allow_pickle=True)\n")
    found = [v.split(":", 1)[1] for v in _violations(bad, tmp_path)]
    assert "import pickle" in found
    assert any("torch.load" in v for v in found)
    assert any("allow_pickle" in v for v in found)


def test_no_pickle_anywhere() -> None:
    files = _python_files()
    assert len(files) > 10
    problems = [v for f in files for v in _violations(f)]
    assert problems == [], "unsafe deserialisation found:\n" + "\n".join(problems)
