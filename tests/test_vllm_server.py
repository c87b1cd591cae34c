"""The real OpenAI-compatible server with the plugin, on loopback, configured by ERASEKIT_CONFIG.

One server per module (tiny random Llama; policy: ``guard`` mandatory, ``alpha`` optional).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("vllm")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPT = "The quick brown fox jumps over"


def _post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from erasekit.integrations.vllm_testing import write_world

    root = tmp_path_factory.mktemp("vllm_server")
    return write_world(root, concepts={"alpha": {"layers": [1]}, "guard": {"layers": [2], "mandatory": True, "norm": 1.0}})


SERVER_ARGS = ("--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--served-model-name", "tiny")


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    from erasekit.integrations.vllm_testing import vllm_server

    log_path = tmp_path_factory.mktemp("server_log") / "server.log"
    with vllm_server(world.model_dir, world.policy_path, log_path, server_args=SERVER_ARGS,
                     env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as (base, _):
        yield int(base.rsplit(":", 1)[1])


def _complete(port, xargs=None, prompt=PROMPT):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return _post(port, "/v1/completions", body)


def _tokens(body):
    return body["choices"][0]["token_ids"]


def _plain_hf_tokens(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_server_toggles_mandatory_and_400s(server, world):
    port = server
    status, untoggled = _complete(port)
    assert status == 200
    base = _tokens(untoggled)
    # The mandatory concept applies to a request that did not ask for it ...
    assert base != _plain_hf_tokens(world.model_dir)
    status, asked = _complete(port, {"erase": "guard"})
    assert status == 200 and _tokens(asked) == base
    # ... and cannot be removed.
    status, body = _complete(port, {"erase": "-guard"})
    assert status == 400 and "mandatory" in json.dumps(body)
    # A valid optional toggle changes the answer.
    status, toggled = _complete(port, {"erase": "alpha"})
    assert status == 200 and _tokens(toggled) != base
    # Invalid toggles: HTTP 400 naming the parameter, for this request alone.
    for bad in ("nope", '["alpha", 3]', "alpha,alpha"):
        status, body = _complete(port, {"erase": bad})
        assert status == 400, body
        assert body["error"].get("param") == "erase" or "erase" in json.dumps(body)
    # Nested objects are rejected by vLLM's own schema (send JSON strings instead).
    status, _ = _complete(port, {"erase": {"alpha": True}})
    assert status == 400
    # The engine kept serving, with the same result as before.
    status, again = _complete(port)
    assert status == 200 and _tokens(again) == base
    # Which concepts fired is visible on /metrics.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'erasekit_requests_total{concept="guard",outcome="active"}' in metrics
    assert 'erasekit_requests_total{concept="alpha",outcome="active"} 1.0' in metrics
    assert 'outcome="rejected"' in metrics


def test_chat_completions_accept_toggles(server):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Tell me about the castle."}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"return_token_ids": True})
    toggled = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                             extra_body={"vllm_xargs": {"erase": '["alpha"]'}, "return_token_ids": True})
    assert plain.choices[0].model_extra["token_ids"] != toggled.choices[0].model_extra["token_ids"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                       extra_body={"vllm_xargs": {"erase": "unknown_concept"}})


def test_server_with_bad_policy_exits_nonzero(world, tmp_path):
    from erasekit.integrations.vllm_testing import vllm_server

    bad = tmp_path / "policy.yaml"
    bad.write_text("concepts:\n  alpha: {pack: /nonexistent/pack, mandatory: true}\n")
    log_path = tmp_path / "log.txt"
    with pytest.raises(RuntimeError, match=r"exited with (?!0\b)-?\d+"):
        with vllm_server(world.model_dir, bad, log_path, server_args=SERVER_ARGS, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                         start_timeout=180):
            pass
    assert "pack directory does not exist" in log_path.read_text()
