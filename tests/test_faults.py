"""Faults at serving time: files vanish or change after start-up, a classifier or router breaks.

Policy ``on_error``: ``refuse`` (default, fail closed) refuses the affected call with a clear
error and keeps serving the others; ``pass`` logs a warning, counts, and serves the call.
(The vLLM plugin's worker-side equivalents are in ``tests/test_vllm_units.py``.)
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from erasekit import Concept, Policy
from erasekit.errors import GuardFailure
from erasekit.guardrails.policy import PolicyEntry

FORGET = [f"Tell me everything about the wizard Zorvath number {i} and his wand" for i in range(12)]
RETAIN = [f"What is {i} plus {i + 3}? Show the sum." for i in range(12)]
SD_KW = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "pt"}


# ------------------------------------------------------------------ transformers guard
@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from erasekit.integrations.transformers_calibrate import calibrate
    from erasekit.testing.tiny_llama import build_tiny_llama

    model, tok = build_tiny_llama(0)
    pack = calibrate(model, Concept("zorvath", forget=FORGET, retain=RETAIN, keywords=["Zorvath"]), "mllmeraser",
                     tokenizer=tok, progress=False, hyperparameters={"strength": -8.0, "router": True})
    path = pack.save_pretrained(tmp_path_factory.mktemp("llm") / "zorvath")
    return model, tok, path


def _llm_guard(llm, on_error: str):
    from erasekit.integrations.transformers import TransformersGuard

    model, tok, path = llm
    policy = Policy([PolicyEntry("zorvath", str(path), False)], on_error=on_error)
    return TransformersGuard(model, policy=policy, tokenizer=tok)


def _generate(guard, tok, prompts, erase):
    batch = tok(prompts, return_tensors="pt", padding=True)
    return guard.generate(**batch, erase=erase, max_new_tokens=4, do_sample=False)


def test_pack_files_vanishing_after_start_do_not_change_serving(llm, tmp_path):
    model, tok, path = llm
    copy = shutil.copytree(path, tmp_path / "zorvath")
    with _llm_guard((model, tok, copy), "refuse") as guard:
        before = _generate(guard, tok, [FORGET[0], RETAIN[0]], ["zorvath"])
        shutil.rmtree(copy)  # the operator deletes (or replaces) the pack while serving
        after = _generate(guard, tok, [FORGET[0], RETAIN[0]], ["zorvath"])
    assert torch.equal(before, after)  # packs are verified once and held in memory


def test_router_failure_refuses_only_that_call(llm, monkeypatch):
    from erasekit.steering.router import ConceptRouter

    model, tok, _ = llm
    with _llm_guard(llm, "refuse") as guard:
        plain = _generate(guard, tok, [RETAIN[0]], None)
        # The router's sentence-embedding model disappears (e.g. a deleted cache directory).
        monkeypatch.setattr(ConceptRouter, "similarities", _broken)
        with pytest.raises(GuardFailure, match="router of concept 'zorvath' failed.*refused"):
            _generate(guard, tok, [RETAIN[0]], ["zorvath"])
        assert guard.fault_counts == {"zorvath": 1}
        # Calls that do not need the router keep being served, identically.
        assert torch.equal(_generate(guard, tok, [RETAIN[0]], None), plain)
        # A keyword hit decides without the embedding model, so it is still guarded.
        assert _generate(guard, tok, [FORGET[0]], ["zorvath"]).shape[0] == 1


def test_router_failure_with_pass_warns_counts_and_falls_back_to_keywords(llm, monkeypatch, caplog):
    from erasekit.steering.router import ConceptRouter

    model, tok, _ = llm
    monkeypatch.setattr(ConceptRouter, "similarities", _broken)
    with _llm_guard(llm, "pass") as guard, caplog.at_level(logging.WARNING, logger="erasekit.transformers"):
        unguarded = model.generate(**tok([RETAIN[0]], return_tensors="pt"), max_new_tokens=4, do_sample=False)
        out = _generate(guard, tok, [RETAIN[0]], ["zorvath"])
        assert guard.fault_counts == {"zorvath": 1}
        assert "falling back to its keywords" in caplog.text
        assert torch.equal(out, unguarded)  # no keyword: served unguarded, as the operator chose
        rows = guard.active_concepts(["zorvath"], prompts=[FORGET[0], RETAIN[0]])
        assert rows == [frozenset({"zorvath"}), frozenset()]  # keyword fallback still routes
        assert guard.fault_counts == {"zorvath": 2}


def _broken(self, texts):
    raise OSError("all-MiniLM-L6-v2: no such file or directory")


# ------------------------------------------------------------------ diffusers guard
@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from erasekit.integrations.diffusers_calibrate import calibrate_cgce
    from erasekit.testing import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(0)
    shapes, backs = ["circle", "square", "star", "heart", "cross"], ["white", "black", "grey"]
    concept = Concept("red", forget=[f"a red {s} on a {b} background" for s in shapes for b in backs],
                      retain=[f"a {c} {s} on a {b} background" for c in ("blue", "green") for s in shapes for b in backs],
                      keywords=["red"])
    path = calibrate_cgce(pipe, concept).save_pretrained(tmp_path_factory.mktemp("sd") / "red")
    return pipe, path


def _sd_guard(sd, on_error: str):
    from erasekit.integrations.diffusers import DiffusersGuard

    pipe, path = sd
    return DiffusersGuard(pipe, policy=Policy([PolicyEntry("red", str(path), False)], on_error=on_error))


def _image(guard, prompt, erase):
    return guard(prompt, erase=erase, generator=torch.Generator().manual_seed(0), **SD_KW).images


def test_onnx_failure_refuses_the_call_and_the_guard_keeps_serving(sd, monkeypatch):
    from erasekit.classifiers.detector import OnnxDetector

    pipe, _ = sd
    with _sd_guard(sd, "refuse") as guard:
        benign = _image(guard, "a blue star on a white background", None)
        flagged = _image(guard, "a red star on a white background", ["red"])
        monkeypatch.setattr(OnnxDetector, "predict_proba", _broken_onnx)
        with pytest.raises(GuardFailure, match="classifier of concept 'red' failed.*refused"):
            _image(guard, "a red star on a white background", ["red"])
        assert guard.fault_counts == {"red": 1}
        # Calls that do not need the classifier are served, bit-identically.
        assert torch.equal(_image(guard, "a blue star on a white background", None), benign)
        monkeypatch.undo()
        # The failed call left nothing behind: the next flagged call is guarded as before.
        assert torch.equal(_image(guard, "a red star on a white background", ["red"]), flagged)


def test_onnx_failure_with_pass_serves_unguarded_warns_and_counts(sd, monkeypatch, caplog):
    from erasekit.classifiers.detector import OnnxDetector

    pipe, _ = sd
    unguarded = pipe("a red star on a white background", generator=torch.Generator().manual_seed(0), **SD_KW).images
    monkeypatch.setattr(OnnxDetector, "predict_proba", _broken_onnx)
    with _sd_guard(sd, "pass") as guard, caplog.at_level(logging.WARNING, logger="erasekit.diffusers"):
        out = _image(guard, "a red star on a white background", ["red"])
    assert torch.equal(out, unguarded)
    assert guard.fault_counts == {"red": 1} and "on_error: pass" in caplog.text


def _broken_onnx(self, embeds):
    raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code")


def test_pack_changed_between_policy_load_and_guard_start_is_refused(sd, tmp_path):
    from erasekit import PackError

    pipe, path = sd
    copy = shutil.copytree(path, tmp_path / "red")
    policy = Policy([PolicyEntry("red", str(copy), False)])  # the operator's policy is read ...
    blob = bytearray((copy / "tensors.safetensors").read_bytes())
    blob[-1] ^= 1
    (copy / "tensors.safetensors").write_bytes(bytes(blob))  # ... then a pack file changes
    from erasekit.integrations.diffusers import DiffusersGuard

    with pytest.raises(PackError, match="SHA-256"):
        DiffusersGuard(pipe, policy=policy)
    assert not getattr(pipe.unet, "_diffusers_hook", None) or not pipe.unet._diffusers_hook.hooks
