"""``erasekit calibrate --method cgce|irece`` on a saved diffusers pipeline directory, then `info` and a guard."""

from __future__ import annotations

import pytest
import torch

from erasekit.cli import main
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.diffusers import guard
from erasekit.testing import build_tiny_sd_pipeline


@pytest.fixture(scope="module")
def saved_pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    pipe = build_tiny_sd_pipeline(0)
    pipe.save_pretrained(root / "pipe")
    shapes = ["circle", "square", "star", "heart"]
    (root / "forget.txt").write_text("\n".join(f"a red {s}" for s in shapes) + "\n")
    (root / "retain.txt").write_text("\n".join(f"a {c} {s}" for c in ("blue", "green") for s in shapes) + "\n")
    return root, pipe


@pytest.mark.parametrize("method", ["cgce", "irece"])
def test_calibrate_info_and_guard(saved_pipe, method, capsys):
    root, pipe = saved_pipe
    out = root / f"pack-{method}"
    args = ["calibrate", "--model", str(root / "pipe"), "--concept", "red", "--forget", str(root / "forget.txt"),
            "--retain", str(root / "retain.txt"), "--method", method, "--keywords", "red", "-o", str(out)]
    if method == "cgce":
        args += ["--set", "eta=1.5"]
    assert main(args) == 0
    assert main(["info", str(out)]) == 0
    assert f'"method": "{method}"' in capsys.readouterr().out
    pack = ConceptPack.from_pretrained(out)
    if method == "cgce":
        assert pack.hyperparameters["eta"] == 1.5 and pack.classifier_onnx
    with guard(pipe, [pack]) as g:  # the pack fits the in-memory pipeline it was saved from
        g("a red star", erase=["red"], num_inference_steps=1, height=32, width=32, output_type="pt",
          generator=torch.Generator().manual_seed(0))


def test_calibrate_rejects_unknown_hyperparameter(saved_pipe, capsys):
    root, _ = saved_pipe
    code = main(["calibrate", "--model", str(root / "pipe"), "--concept", "red", "--forget", str(root / "forget.txt"),
                 "--retain", str(root / "retain.txt"), "--method", "cgce", "--set", "learning_rate=3",
                 "-o", str(root / "bad")])
    assert code == 2
    assert "learning_rate" in capsys.readouterr().err
    assert not (root / "bad").exists()
