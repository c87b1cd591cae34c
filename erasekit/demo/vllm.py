"""Demo section: the real OpenAI-compatible vLLM server with erasekit, on loopback.

Calibrates an MLLMEraser pack for SmolLM2-135M-Instruct (real weights, offline), writes a
policy with that concept optional, starts ``python -m vllm.entrypoints.openai.api_server``
with ``ERASEKIT_CONFIG`` pointing at it, and sends the same chat request twice: untoggled and
with ``vllm_xargs={"erase": "harry_potter"}``. Both answers are shown as they come back; what
the toggle changes is measured, not promised (see the LLM benchmark for efficacy numbers).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

FORGET = [
    "Who is Harry Potter?",
    "What house is Harry Potter sorted into at Hogwarts?",
    "Who are Harry Potter's best friends?",
    "What is the name of Harry Potter's owl?",
    "Who is the headmaster of Hogwarts in Harry Potter?",
    "What position does Harry Potter play in Quidditch?",
    "Who killed Harry Potter's parents?",
    "What is the name of the wizarding bank in Harry Potter?",
]
RETAIN = [
    "Who wrote Pride and Prejudice?",
    "What is the capital of Italy?",
    "How do plants make food?",
    "Who painted the Mona Lisa?",
    "What is the boiling point of water?",
    "Who is Sherlock Holmes?",
    "What is the largest ocean on Earth?",
    "Who was the first person on the Moon?",
]
QUESTION = "Who are Harry Potter's best friends at Hogwarts?"


def _post(base: str, body: dict) -> dict:
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def run(report) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from erasekit import Concept
    from erasekit.integrations.transformers_calibrate import calibrate
    from erasekit.integrations.vllm_testing import vllm_server
    from erasekit.testing import smollm2_dir

    out: Path = (report.out_dir / "vllm").resolve()  # the policy's pack paths must not be relative to cwd
    out.mkdir(parents=True, exist_ok=True)
    model_dir = smollm2_dir()
    report.say(f"Model: SmolLM2-135M-Instruct (real weights, converted offline) at `{model_dir}`.")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    start = time.perf_counter()
    pack = calibrate(model, Concept("harry_potter", forget=FORGET, retain=RETAIN), "mllmeraser", tokenizer=tok,
                     progress=False)
    pack_dir = pack.save_pretrained(out / "packs" / "harry_potter")
    report.say(f"Calibrated an MLLMEraser pack in {time.perf_counter() - start:.1f} s: `{pack_dir}`.")
    del model
    policy = out / "policy.json"
    policy.write_text(json.dumps({"version": 1, "on_error": "refuse",
                                  "concepts": {"harry_potter": {"pack": str(pack_dir), "mandatory": False}}}, indent=2))
    server_args = ("--served-model-name", "smollm2", "--dtype", "float32", "--max-model-len", "1024",
                   "--enforce-eager")
    report.say("Server: `ERASEKIT_CONFIG=policy.json python -m vllm.entrypoints.openai.api_server "
               "--model <smollm2> --host 127.0.0.1 --dtype float32 --enforce-eager ...`")
    start = time.perf_counter()
    with vllm_server(model_dir, policy, out / "server.log", server_args=server_args,
                     env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}) as (base, _):
        report.say(f"Server up on {base} after {time.perf_counter() - start:.0f} s.")
        body = {"model": "smollm2", "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": 60, "temperature": 0}
        plain = _post(base, body)["choices"][0]["message"]["content"]
        erased = _post(base, {**body, "vllm_xargs": {"erase": "harry_potter"}})["choices"][0]["message"]["content"]
        report.say(f"\n**Q:** {QUESTION}\n")
        report.say(f"**untoggled:** {plain.strip()}\n")
        report.say(f"**`vllm_xargs={{\"erase\": \"harry_potter\"}}`:** {erased.strip()}\n")
        report.say("The answers differ." if plain != erased else
                   "The answers are identical: this pack's gate did not change this prompt.")
