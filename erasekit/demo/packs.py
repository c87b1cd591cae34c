"""Demo section: what a pack is on disk, and the safety checks around it and the policy."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from erasekit import Concept, ConceptPack, ErasekitError, Policy, fingerprint_model


def run(report) -> None:
    from erasekit.testing import build_tiny_llama

    model, _ = build_tiny_llama(seed=0)
    fingerprint = fingerprint_model(model)
    hidden = fingerprint.hidden_size
    pack = ConceptPack(
        concept=Concept("demo_concept", forget=("a prompt that elicits it",), retain=("a benign prompt",)),
        method="add_vector",
        fingerprint=fingerprint,
        tensors={"vector.1": torch.linspace(-1, 1, hidden)},
        hyperparameters={"scale": -2.0},
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = pack.save_pretrained(Path(tmp) / "tiny-llama-demo_concept")
        report.say(f"Saved a pack: {sorted(p.name for p in path.iterdir())}")
        manifest = json.loads((path / "manifest.json").read_text())
        report.say(f"Manifest records method={manifest['method']!r}, model "
                   f"{manifest['model_fingerprint']['architecture']} with {manifest['model_fingerprint']['num_layers']} "
                   f"layers, embedding hash {manifest['model_fingerprint']['embedding_sha256'][:12]}...")
        ConceptPack.from_pretrained(path, model=model)
        report.say("Loaded against the model it was calibrated on: OK.")

        other, _ = build_tiny_llama(seed=1)
        _expect_refusal(report, "Loading it against another model", lambda: ConceptPack.from_pretrained(path, model=other))
        blob = bytearray((path / "tensors.safetensors").read_bytes())
        blob[-3] ^= 0x55
        (path / "tensors.safetensors").write_bytes(bytes(blob))
        _expect_refusal(report, "Loading it after flipping one byte", lambda: ConceptPack.from_pretrained(path))

    policy = Policy({"nudity": {"mandatory": True}, "van_gogh": {}, "harry_potter": {}})
    report.say(f"\nOperator policy: {policy}")
    for request in (None, ["van_gogh"], "harry_potter,van_gogh"):
        report.say(f"request erase={request!r:28} -> active {sorted(policy.resolve(request))}")
    for request in (["-nudity"], {"nudity": False}, ["mickey_mouse"], "[oops"):
        _expect_refusal(report, f"request erase={request!r}", lambda r=request: policy.resolve(r))


def _expect_refusal(report, what: str, action) -> None:
    try:
        action()
    except ErasekitError as exc:
        report.say(f"{what}: refused -> {exc}")
        return
    raise AssertionError(f"{what} was accepted; erasekit must refuse it")
