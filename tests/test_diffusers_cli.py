"""``erasekit calibrate --method cgce|irece`` on a saved diffusers pipeline directory, then `info` and a guard."""

from __future__ import annotations

import json

import pytest
import torch

import erasekit
from erasekit.cli import main
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.diffusers import guard
from erasekit.testing import build_tiny_sd_pipeline


def _calibrate_args(root, method: str, out, *extra: str, keywords: bool = True) -> list[str]:
    """``erasekit calibrate`` of concept "red" on ``root``'s saved pipeline and prompt files."""
    return ["calibrate", "--model", str(root / "pipe"), "--concept", "red", "--forget", str(root / "forget.txt"),
            "--retain", str(root / "retain.txt"), "--method", method, *(["--keywords", "red"] if keywords else []),
            "-o", str(out), *extra]


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
    assert main(_calibrate_args(root, method, out, *(["--set", "eta=1.5"] if method == "cgce" else []))) == 0
    assert main(["info", str(out)]) == 0
    assert f'"method": "{method}"' in capsys.readouterr().out
    pack = ConceptPack.from_pretrained(out)
    assert "call_kwargs" not in pack.hyperparameters  # no --call: nothing recorded, the pack reads as before
    if method == "cgce":
        assert pack.hyperparameters["eta"] == 1.5 and pack.classifier_onnx
    with guard(pipe, [pack]) as g:  # the pack fits the in-memory pipeline it was saved from
        g("a red star", erase=["red"], num_inference_steps=1, height=32, width=32, output_type="pt",
          generator=torch.Generator().manual_seed(0))


def test_calibrate_cgce_with_anchor_text(saved_pipe, capsys):
    root, pipe = saved_pipe
    out = root / "pack-anchor-text"
    assert main(_calibrate_args(root, "cgce", out, "--set", "anchor_text=, in green")) == 0
    pack = ConceptPack.from_pretrained(out)
    assert pack.hyperparameters["anchor_text"] == ", in green"
    with guard(pipe, [pack]) as g:
        g(["a red star", "a blue star"], erase=["red"], num_inference_steps=1, height=32, width=32,
          output_type="pt", generator=torch.Generator().manual_seed(0))
        assert g.last_report.anchored == {"red": [2]}
    code = main(_calibrate_args(root, "cgce", root / "bad-anchor-text", "--set", "anchor_text=7"))
    assert code == 2 and "anchor_text" in capsys.readouterr().err and not (root / "bad-anchor-text").exists()


def test_calibrate_cgce_with_detection_head(saved_pipe, capsys):
    root, pipe = saved_pipe
    out = root / "pack-detect"
    assert main(_calibrate_args(root, "cgce", out, "--set", 'detect_phrases=["red", "crimson"]')) == 0
    pack = ConceptPack.from_pretrained(out)
    assert pack.hyperparameters["detect_phrases"] == ["red", "crimson"] and pack.hyperparameters["detect_tau"] == 0.05
    with guard(pipe, [pack]) as g:
        g(["a red star", "a blue star"], erase=["red"], num_inference_steps=1, height=32, width=32,
          output_type="pt", generator=torch.Generator().manual_seed(0))
        assert set(g.last_report.scores) == {"red"}
    code = main(_calibrate_args(root, "cgce", root / "bad-detect", "--set", "detect_phrases=red"))
    assert code == 2 and "detect_phrases" in capsys.readouterr().err and not (root / "bad-detect").exists()


def test_calibrate_rejects_unknown_hyperparameter(saved_pipe, capsys):
    root, _ = saved_pipe
    code = main(_calibrate_args(root, "cgce", root / "bad", "--set", "learning_rate=3", keywords=False))
    assert code == 2
    assert "learning_rate" in capsys.readouterr().err
    assert not (root / "bad").exists()


# ---------------------------------------------------------------- --call: pipeline-call settings
# The tiny CogVideoX's own defaults (49 frames at 480x720, 50 steps, 226 T5 tokens) are what a
# user without --call would calibrate under; the tests pass the served settings on the command line.
VIDEO_CALL = {"num_frames": 8, "height": 16, "width": 16, "num_inference_steps": 2, "max_sequence_length": 16}


def _call_args(call: dict) -> list[str]:
    return [a for k, v in call.items() for a in ("--call", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def saved_video(tmp_path_factory):
    from tests.test_diffusers_pipelines import SHAPES, build_cogvideox

    root = tmp_path_factory.mktemp("cli-video")
    pipe, _ = build_cogvideox()
    pipe.save_pretrained(root / "pipe")
    pipe.set_progress_bar_config(disable=True)
    (root / "forget.txt").write_text("\n".join(f"a red {s} on a white background" for s in SHAPES) + "\n")
    (root / "retain.txt").write_text("\n".join(f"a {c} {s} on a white background" for c in ("blue", "green")
                                               for s in SHAPES) + "\n")
    return root, pipe


@pytest.mark.parametrize("method", ["irece", "cgce"])
def test_calibrate_video_pipeline_with_call_settings(saved_video, method, capsys):
    root, pipe = saved_video
    out = root / f"pack-{method}"
    extra = ["--set", "n_prompts=4", "--set", "n_holdout=4"] if method == "irece" else []
    assert main(_calibrate_args(root, method, out, *extra, *_call_args(VIDEO_CALL))) == 0
    err = capsys.readouterr().err
    pack = ConceptPack.from_pretrained(out)
    if method == "irece":
        # every setting reached the pipeline: 2 steps -> 2 per-step probes and gate thresholds
        assert pack.hyperparameters["call_kwargs"] == VIDEO_CALL
        assert pack.hyperparameters["denoiser_family"] == "cogvideox"
        assert list(pack.tensors["gate_threshold"].shape) == [2]
    else:
        # CGCE encodes with the served settings (16 T5 tokens, not 226); steps/CFG do not shape it
        encode = {k: v for k, v in VIDEO_CALL.items() if k != "num_inference_steps"}
        assert pack.hyperparameters["call_kwargs"] == encode
        assert pack.hyperparameters["seq_len"] == 16
        assert "--call num_inference_steps not used" in err
    assert main(["info", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["hyperparameters"]["call_kwargs"] == pack.hyperparameters["call_kwargs"]
    assert "Calibrated with pipeline call settings: " in captured.err and "num_frames=8" in captured.err
    with erasekit.guard(pipe, [pack]) as g:  # the pack attaches to the pipeline it was calibrated for
        frames = g("a red star on a white background", erase=["red"], output_type="pt",
                   generator=torch.Generator().manual_seed(0), **VIDEO_CALL).frames
    assert frames.shape[0] == 1 and frames.shape[1] > 1


@pytest.mark.parametrize(("setting", "says"), [
    ("num_frame=8", "has no such parameter"),            # typo: the fix lists num_frames
    ("num_frames=nine", "expects int or null"),          # wrong type
    ("num_frames=8.5", "expects int or null"),
    ("use_dynamic_cfg=1", "expects bool"),
    ("height=[16]", "not a JSON scalar"),
    ("guidance_scale=NaN", "not a finite number"),
    ("output_type=pt", "calibration sets this argument itself"),
    ("timesteps=5", "cannot express"),                   # takes a list
    ("prompt_embeds=null", "cannot express"),            # a tensor argument
    ("num_frames", "expected KEY=VALUE"),
])
def test_calibrate_rejects_bad_call_setting(saved_video, setting, says, capsys):
    root, _ = saved_video
    out = root / "bad"
    assert main(_calibrate_args(root, "irece", out, "--call", "height=16", "--call", setting)) == 2
    err = capsys.readouterr().err
    key = setting.partition("=")[0]
    assert "--call" in err and repr(key) in err and says in err and "Fix:" in err
    if "no such parameter" in says:
        assert "'num_frames'" in err.split("Fix:")[1]
    assert not out.exists()


def test_call_settings_refused_for_language_model_methods(saved_pipe, capsys):
    root, _ = saved_pipe
    code = main(_calibrate_args(root, "kif", root / "bad-kif", "--call", "num_frames=8", keywords=False))
    assert code == 2
    err = capsys.readouterr().err
    assert "--call" in err and "'num_frames'" in err and "--method cgce|irece" in err


def test_set_cannot_smuggle_call_kwargs(saved_pipe, capsys):
    root, _ = saved_pipe
    code = main(_calibrate_args(root, "irece", root / "bad-set", "--set", 'call_kwargs={"height": 32}',
                                keywords=False))
    assert code == 2
    assert "--call KEY=VALUE" in capsys.readouterr().err


# ---------------------------------------------------------------- CGCE anchor from the command line
def test_calibrate_cgce_with_anchor_prompts(saved_pipe, capsys):
    root, pipe = saved_pipe
    (root / "anchor.txt").write_text("a plain circle\na plain square\na plain star\na plain heart\n")
    out = root / "pack-anchor"
    assert main(_calibrate_args(root, "cgce", out, "--target", "plain", "--anchor-prompts",
                                str(root / "anchor.txt"))) == 0
    pack = ConceptPack.from_pretrained(out)
    hp = pack.hyperparameters
    assert hp["anchor"] == 1 and "plain" in hp["anchor_prompt"] and {"anchor_twin_weight", "anchor_twin_bias",
                                                                        "anchor_concept_embedding"} <= set(pack.tensors)
    with guard(pipe, [pack]) as g:  # the anchored pack serves like any other
        g("a red star", erase=["red"], num_inference_steps=1, height=32, width=32, output_type="pt",
          generator=torch.Generator().manual_seed(0))
    assert g.last_report.flagged["red"] and g.last_report.refine_steps > 0


@pytest.mark.parametrize(("method", "extra", "field", "fix"), [
    ("cgce", ["--anchor-prompts", "forget.txt"], "--anchor-prompts", "--target PHRASE"),  # anchor without a name
    ("cgce", ["--target", "plain"], "--target", "--anchor-prompts FILE"),                # name without prompts
    ("irece", ["--target", "plain", "--anchor-prompts", "forget.txt"], "--anchor-prompts", "--method cgce"),
    ("kif", ["--anchor-prompts", "forget.txt"], "--anchor-prompts", "--method cgce"),
    ("cgce", ["--anchor-retain", "retain.txt"], "--anchor-retain", "--anchor-prompts FILE"),  # negatives of no anchor
    ("cgce", ["--target", "plain", "--anchor-prompts", "one.txt"], "--anchor-prompts", "at least 2"),
    ("cgce", ["--target", "plain", "--anchor-prompts", "forget.txt", "--anchor-retain", "empty.txt"],
     "--anchor-retain", "one prompt per line"),
])
def test_calibrate_refuses_incomplete_or_misplaced_anchor(saved_pipe, method, extra, field, fix, capsys):
    root, _ = saved_pipe
    (root / "one.txt").write_text("a plain circle\n")
    (root / "empty.txt").write_text("# no prompts\n\n")
    extra = [str(root / a) if a.endswith(".txt") else a for a in extra]
    out = root / f"bad-anchor-{method}"
    assert main(_calibrate_args(root, method, out, *extra)) == 2
    err = capsys.readouterr().err
    assert field in err and fix in err
    assert not out.exists()


def test_anchor_of_a_long_concept_name_is_a_valid_concept(tmp_path):
    import argparse

    from erasekit.guardrails.concept import Concept
    from erasekit.integrations.diffusers_calibrate import anchor_from_args

    (tmp_path / "anchor.txt").write_text("a plain circle\na plain square\n")
    args = argparse.Namespace(method="cgce", target="plain", anchor_prompts=str(tmp_path / "anchor.txt"),
                              anchor_retain=None)
    anchor = anchor_from_args(args, Concept("x" * 64, forget=["a"], retain=["b"]))  # names may be 64 long
    assert anchor.keywords == ("plain",) and anchor.forget == ("a plain circle", "a plain square")


# ---------------------------------------------------------------- --templates: generated contrast pairs
def _pair_files(root) -> list[str]:
    """``--templates/--phrases/--contrasts`` files for concept "red" on the tiny pipeline."""
    (root / "templates.txt").write_text("a photo of {concept}\n{concept} on a table\n# a comment\na drawing of {concept}\n")
    (root / "phrases.txt").write_text("a red star\na red circle\n")
    (root / "contrasts.txt").write_text("a blue star\na green circle\na yellow square\n")
    return ["--templates", str(root / "templates.txt"), "--phrases", str(root / "phrases.txt"),
            "--contrasts", str(root / "contrasts.txt")]


def test_calibrate_cgce_from_generated_pairs(saved_pipe):
    root, pipe = saved_pipe
    out = root / "pack-pairs"
    args = ["calibrate", "--model", str(root / "pipe"), "--concept", "red", "--method", "cgce", "--keywords", "red",
            *_pair_files(root), "--pairs-seed", "4", "-o", str(out)]
    assert main(args) == 0
    pack = ConceptPack.from_pretrained(out)
    assert len(pack.concept.forget) == len(pack.concept.retain) == 6  # 3 templates x 2 phrases
    assert "a photo of a red star" in pack.concept.forget
    assert pack.concept.metadata["pairs"]["seed"] == 4 and pack.concept.metadata["pairs"]["phrases"] == [
        "a red star", "a red circle"]
    with guard(pipe, [pack]) as g:
        g(["a red star", "a blue star"], erase=["red"], num_inference_steps=1, height=32, width=32,
          output_type="pt", generator=torch.Generator().manual_seed(0))
    # files and pairs together: the files' prompts first, then the pairs
    both = root / "pack-pairs-and-files"
    assert main(_calibrate_args(root, "cgce", both, *_pair_files(root), "--pairs", "5")) == 0
    concept = ConceptPack.from_pretrained(both).concept
    assert len(concept.forget) == 4 + 5 and concept.forget[0] == "a red circle"
    assert len(concept.retain) == 8 + 5


@pytest.mark.parametrize(("drop", "extra", "field"), [
    ("--contrasts", [], "--contrasts"),          # pairs need all three files
    (None, ["--pairs", "99"], "n"),              # more pairs than 3 x 2 x 3 distinct ones (flag --pairs)
    (None, ["--templates", "phrases.txt"], "templates[0]"),  # a "template" without a {concept} slot
    ("all", ["--pairs", "3"], "--pairs"),        # --pairs without templates
    ("all", [], "--forget"),                     # no prompts at all
])
def test_calibrate_refuses_incomplete_pairs(saved_pipe, drop, extra, field, capsys):
    root, _ = saved_pipe
    files = _pair_files(root)
    if drop == "all":
        files = []
    elif drop:
        i = files.index(drop)
        files = files[:i] + files[i + 2:]
    out = root / "bad-pairs"
    extra = [str(root / a) if a.endswith(".txt") else a for a in extra]
    args = ["calibrate", "--model", str(root / "pipe"), "--concept", "red", "--method", "cgce", *files, *extra,
            "-o", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"field '{field}'" in err
    if field == "n":
        assert "--pairs: field" in err
    if field == "templates[0]":
        assert "phrases.txt: field" in err
    assert not out.exists()


def test_calibrate_cgce_with_subphrases(saved_pipe, capsys):
    root, _ = saved_pipe
    (root / "synonyms.txt").write_text("red\ncrimson red\nscarlet red thing\n")
    out = root / "pack-subphrases"
    assert main(_calibrate_args(root, "cgce", out, "--subphrases", str(root / "synonyms.txt"))) == 0
    concept = ConceptPack.from_pretrained(out).concept
    assert "subphrases" in concept.metadata  # which words survive depends on the (random) encoder
    assert concept.forget[:4] == ("a red circle", "a red square", "a red star", "a red heart")
    assert main(_calibrate_args(root, "kif", root / "bad-sub", "--subphrases", str(root / "synonyms.txt"))) == 2
    assert "--subphrases" in capsys.readouterr().err and not (root / "bad-sub").exists()


def test_calibrate_cgce_subphrases_add_cut_prompts(pipe, monkeypatch):
    import numpy as np

    from erasekit.guardrails.concept import Concept
    from erasekit.integrations import diffusers_calibrate as dc

    concept = Concept("red", forget=["a crimson red star", "a red circle", "a crimson red heart"],
                      retain=["a blue star", "a green circle"], keywords=["red"])
    # the tiny random encoder puts "crimson" nearer a retain word than "red": no extra prompts
    pack = dc.calibrate_cgce(pipe, concept, subphrases=["red", "crimson red"])
    assert pack.concept.metadata["subphrases"] == {} and len(pack.concept.forget) == 3

    def toy_vectors(_pipe, texts, **_):  # "crimson" on "red"'s axis, every other word elsewhere
        return np.array([[1.0, 0.0] if t in ("red", "crimson", "crimson red") else [0.0, 1.0] for t in texts])

    monkeypatch.setattr(dc, "phrase_vectors", toy_vectors)
    pack = dc.calibrate_cgce(pipe, concept, subphrases=["red", "crimson red"])
    assert pack.concept.metadata["subphrases"] == {"crimson red": ["crimson"]}
    assert pack.concept.forget[3:] == ("a crimson star", "a crimson heart")
