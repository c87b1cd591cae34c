"""Preemption with recompute: a KV cache far too small for the batch makes vLLM V1 preempt.

A preempted request loses its batch slot and its KV; when it is scheduled again vLLM recomputes
its prompt *and* the tokens it had already generated (one chunk that is part prefill, part
already-sampled output), in whatever slot is free. erasekit must re-resolve its concepts from
the request's own parameters (never from the slot's previous owner), edit the recomputed rows
exactly as the first time, and forget the request when it finishes.

Checked here with the tiny Llama, fp32, torch.compile on: the preemption counter proves
preemption happened (and the carrier's resume counter that a *toggled* request was among the
preempted), toggled requests' tokens equal the same requests served alone (no preemption),
untoggled ones equal plain vLLM, and the carrier's slot tables are empty at the end.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

#: 5 blocks x 32 tokens (one is vLLM's null block: 128 usable tokens) for the whole engine; every request needs 2 blocks
#: (about 8 prompt + 40 generated tokens), so six at once cannot all fit.
KV = {"block_size": 32, "num_gpu_blocks_override": 5, "max_model_len": 128}
PROMPTS = [
    "The quick brown fox jumps over",
    "Once upon a time, in a land",
    "Harry looked at the castle and",
    "The capital of France is",
    "Water boils at a temperature of",
    "She opened the letter and read",
]
#: vLLM preempts the most recently admitted requests first: toggled ones sit at the end.
TOGGLES = [None, "beta", None, "alpha,beta", "alpha", ["alpha"]]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from erasekit.integrations.vllm_testing import write_world

    root = tmp_path_factory.mktemp("vllm_preemption")
    # beta is prefill-only: on recompute, the re-run prompt rows must be edited and the re-run
    # output rows must not (they are classified as decode, as when they were first generated).
    return write_world(root, concepts={"alpha": {"layers": [1]}, "beta": {"layers": [2], "phases": ["prefill"]}})


@pytest.fixture(scope="module")
def engines(world):
    from vllm import LLM

    saved = os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function (test only)
    common = dict(dtype="float32", gpu_memory_utilization=0.2, seed=0, disable_log_stats=False, **KV)
    plain = LLM(model=str(world.model_dir), enforce_eager=True, **common)
    guarded = LLM(model=str(world.model_dir), enforce_eager=False,
                  additional_config={"erasekit": {"policy": str(world.policy_path)}}, **common)
    yield plain, guarded
    for llm in (plain, guarded):
        llm.llm_engine.engine_core.shutdown()
    if saved is None:
        os.environ.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)
    else:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = saved


def _tokens(llm, prompts, toggles):
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                             extra_args={"erase": t} if t is not None else None) for t in toggles]
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def _preemptions() -> float:
    """vLLM's ``vllm:num_preemptions`` counter (every engine of this process, cumulative)."""
    from vllm.v1.metrics.reader import get_metrics_snapshot

    return sum(m.value for m in get_metrics_snapshot() if m.name == "vllm:num_preemptions")


def _worker_state(llm) -> dict:
    from erasekit.integrations.vllm_testing import worker_erasekit_state

    (state,) = llm.collective_rpc(worker_erasekit_state)
    return state


def test_preempted_requests_match_unpreempted_runs_and_leave_no_state(engines):
    plain, guarded = engines
    # References, one request at a time: a lone request fits the cache, so nothing is preempted.
    before = _preemptions()
    expected = [_tokens(guarded if t is not None else plain, [p], [t])[0] for p, t in zip(PROMPTS, TOGGLES, strict=True)]
    assert _preemptions() == before, "a lone request was preempted: the references are not preemption-free"
    resumed_before = _worker_state(guarded)["requests_resumed"]

    got = _tokens(guarded, PROMPTS, TOGGLES)

    preempted = _preemptions() - before
    state = _worker_state(guarded)
    if preempted == 0:
        pytest.fail(f"vLLM did not preempt anything with {KV}: this test would prove nothing; shrink the cache")
    assert state["requests_resumed"] > resumed_before, (
        f"{preempted:.0f} preemptions, but no toggled request was resumed: the guarded path was not exercised")
    # install() told vLLM that no custom logits processor reads output token ids (the carrier does
    # not); the outputs below, preemptions and resumes included, are unchanged by it
    assert state["output_token_ids_needed"] is False
    for i, (prompt, toggle) in enumerate(zip(PROMPTS, TOGGLES, strict=True)):
        kind = "toggled (vs the same request alone)" if toggle is not None else "untoggled (vs plain vLLM)"
        assert got[i] == expected[i], f"request {i} {prompt!r}, {kind}, after {preempted:.0f} preemptions"
    # Toggles must have mattered, or equality above would be vacuous.
    assert any(got[i] != _tokens(plain, [PROMPTS[i]], [None])[0] for i, t in enumerate(TOGGLES) if t is not None)
    assert state["slots"] == {} and state["refused"] == {}, f"per-request state left behind: {state}"
    assert state["errors"] == 0
