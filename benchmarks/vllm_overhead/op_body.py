"""Time the erasekit vLLM op body: without an engine per decode step, or inside a real engine.

    python -m benchmarks.vllm_overhead.op_body [--rows 16] [--d 128] [--dtype float32] [--repeats 9]
    python -m benchmarks.vllm_overhead.op_body --engine 8

Mirrors ``python -m benchmarks.vllm_overhead`` (tiny Llama: d = 128, 16 requests, two
``add_vector`` concepts at layers 1 and 2, "half toggled" = the benchmark's ``_half``: odd
requests, every other of them with both concepts) but calls ``torch.ops.erasekit.vllm_edit_``
directly on ``[rows, d]`` tensors with a fake runner, so the number is the op's own cost (dispatch
+ Python + tensor ops) for one step, i.e. one call per hooked layer. Scenarios:

* ``none``: no slot active (what benign traffic pays: the op call and one dict check);
* ``decode_half`` / ``decode_all``: steady decode, the plan is reused;
* ``bump_same``: the carrier's version changes every step but the toggled requests keep their
  rows (an untoggled request joined, left or moved): the layout is checked, the plan kept;
* ``recall_decode``: the toggled rows alternate between two layouts (a layout seen again);
* ``rebuild_decode``: every step a layout not among the recent plans (a toggled request joined
  or left; the layouts cycle through more variants than the plan cache keeps): a plan is built;
* ``rebuild_prefill``: the same for a prefill step (every request 12 prompt tokens).

Each scenario runs ``--iters`` steps ``--repeats`` times; the median per-step time is printed
(min in brackets). The default clock is this thread's CPU time, so time the process spends
descheduled by other jobs does not count; cache and frequency effects of a loaded machine still
do, so compare before/after runs made back to back (or interleaved), not across sessions.

``--engine N`` instead starts the benchmark's guarded engine (tiny Llama, compiled, same packs)
and runs its workload (16 requests x 64 tokens) N times per mode (no / half / all toggled,
interleaved). It wraps the eraser's ``apply`` in the worker with a CPU-time timer and prints, per
run, the time inside the op body (all calls, and steady calls, i.e. steps that did not re-derive
the plan), the share of the run's wall time, and the plan counters of ``EngineEraser.stats()``
(steps that re-derived the layout, built a plan, recalled one). Test-only machinery: it sets
``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` to reach the worker.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import numpy as np
import torch

from benchmarks.vllm_overhead.__main__ import _half


class _Batch:
    def __init__(self, lengths, computed, prompt):
        self.num_reqs = len(lengths)
        self.num_computed_tokens_cpu = np.array(computed)
        self.num_prompt_tokens = np.array(prompt)


def _runner(lengths, computed, prompt):
    qsl = np.zeros(len(lengths) + 4, dtype=np.int32)  # vLLM's buffer is longer than the batch
    qsl[1: len(lengths) + 1] = np.cumsum(lengths)
    qsl[len(lengths) + 1:] = qsl[len(lengths)]
    return SimpleNamespace(input_batch=_Batch(lengths, computed, prompt), query_start_loc=SimpleNamespace(np=qsl))


def _slots(toggles):
    return {i: frozenset(t.split(",")) for i, t in enumerate(toggles) if t}


def scenario(name: str, rows: int, d: int, dtype: torch.dtype, iters: int, repeats: int,
             clock=time.thread_time) -> list[float]:
    from erasekit.integrations.vllm_edit import EngineEraser
    from erasekit.steering.residual import AddVector

    g = torch.Generator().manual_seed(0)
    edits = {c: AddVector(c, {layer: torch.randn(d, generator=g).to(dtype) for layer in (1, 2)}) for c in ("alpha", "beta")}
    prefill = name == "rebuild_prefill"
    lengths = [12 if prefill else 1] * rows
    computed = [0 if prefill else 20] * rows
    runner = _runner(lengths, computed, [12] * rows)
    half = _slots(_half(rows))
    full = _slots(["alpha,beta"] * rows)
    base = {} if name == "none" else full if name == "decode_all" else half
    carrier = SimpleNamespace(slots=dict(base), refused={}, errors=0, version=0, fail_slots=lambda s: None,
                              requests_guarded=0)
    eraser = EngineEraser(runner, carrier, edits, [1, 2])
    n = sum(lengths)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    residual = torch.randn(n, d, generator=g).to(dtype)
    h, r = hidden.clone(), residual.clone()
    # layouts to cycle through: one request's concepts replaced by {alpha}, {beta} or {alpha, beta}
    variants = [base]
    for j in range(rows):
        for concepts in ({"alpha"}, {"beta"}, {"alpha", "beta"}):
            if frozenset(concepts) != base.get(j):
                variants.append({**base, j: frozenset(concepts)})
    cycle = variants[:2] if name == "recall_decode" else variants  # more layouts than the plan cache keeps
    op = torch.ops.erasekit.vllm_edit_
    key = eraser.key
    out = []
    for _ in range(repeats):
        start = clock()
        for i in range(iters):
            if name in ("recall_decode", "rebuild_decode", "rebuild_prefill"):
                carrier.slots = cycle[i % len(cycle)]
                carrier.version += 1
            elif name == "bump_same":
                carrier.version += 1
            op(h, r, 1, key)
            op(h, r, 2, key)
            if i % 64 == 63:  # keep values bounded (the edits add to h every step)
                h.copy_(hidden)
                r.copy_(residual)
        out.append((clock() - start) / iters * 1e6)
    counts = {k: getattr(eraser, k) for k in ("plans_checked", "plans_built", "plans_recalled") if hasattr(eraser, k)}
    return out, {k: round(v / (iters * repeats), 2) for k, v in counts.items()}


SCENARIOS = ["none", "decode_half", "decode_all", "bump_same", "recall_decode", "rebuild_decode", "rebuild_prefill"]


def _install_timer(worker: object) -> bool:
    """In the worker: time every ``apply`` call (thread CPU time), split by whether the step
    re-derived its plan."""
    eraser = worker.model_runner._erasekit_eraser
    apply = type(eraser).apply
    eraser._timer = {"all": [0, 0], "steady": [0, 0]}

    def timed(layer, hidden, residual):
        checked = getattr(eraser, "plans_checked", None)
        start = time.thread_time_ns()
        apply(eraser, layer, hidden, residual)
        spent = time.thread_time_ns() - start
        for part in ("all", "steady") if checked is not None and eraser.plans_checked == checked else ("all",):
            eraser._timer[part][0] += spent
            eraser._timer[part][1] += 1

    eraser.apply = timed
    return True


def _read_timer(worker: object) -> dict:
    eraser = worker.model_runner._erasekit_eraser
    out = {"timer": eraser._timer, **eraser.stats()}
    eraser._timer = {"all": [0, 0], "steady": [0, 0]}
    return out


def engine(reps: int) -> None:
    import os
    import tempfile
    from pathlib import Path

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a callable (tests only)
    from benchmarks.vllm_overhead.__main__ import _engine, _prompts, _run
    from erasekit.integrations.vllm_plugin import register
    from erasekit.integrations.vllm_testing import write_world

    register()
    world = write_world(Path(tempfile.mkdtemp(prefix="erasekit-op-body-")),
                        concepts={"alpha": {"layers": [1, 2]}, "beta": {"layers": [1, 2]}}, norm=2.0)
    llm = _engine(world.model_dir, world.policy_path, False, 16)
    prompts = _prompts(16)
    modes = {"none": [None] * 16, "half": _half(16), "all": ["alpha,beta"] * 16}
    for toggles in modes.values():
        _run(llm, prompts, toggles, 8)
    llm.collective_rpc(_install_timer)
    counters = ("plans_checked", "plans_built", "plans_recalled", "plan_us")
    rows = {m: [] for m in modes}
    (before,) = llm.collective_rpc(_read_timer)
    names = list(modes)
    for rep in range(reps):
        for mode in names[rep % 3:] + names[: rep % 3]:
            elapsed, _ = _run(llm, prompts, modes[mode], 64)
            (after,) = llm.collective_rpc(_read_timer)
            rows[mode].append((elapsed * 1e6, after["timer"], {k: after.get(k, 0) - before.get(k, 0) for k in counters}))
            before = after
    llm.llm_engine.engine_core.shutdown()
    print("in the engine, per run of 16 requests x 64 tokens (thread CPU time inside the op body):")
    for mode, runs in rows.items():
        for wall_us, timer, plans in runs:
            (t_all, n_all), (t_st, n_st) = timer["all"], timer["steady"]
            print(f"{mode:<5} wall {wall_us / 1e3:7.1f} ms  op {t_all / 1e3:7.0f} us ({100 * t_all / 1e3 / wall_us:.2f} %) "
                  f"in {n_all} calls, steady {t_st / 1e3 / max(n_st, 1):5.1f} us/call  "
                  + " ".join(f"{k} {v}" for k, v in plans.items()))
        if runs:
            med = statistics.median(100 * r[1]["all"][0] / 1e3 / r[0] for r in runs)
            steady = statistics.median(r[1]["steady"][0] / 1e3 / max(r[1]["steady"][1], 1) for r in runs)
            print(f"{mode:<5} median: op {med:.2f} % of wall, steady {steady:.1f} us/call")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vllm_overhead.op_body", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16, help="requests in the batch")
    parser.add_argument("--d", type=int, default=128, help="hidden size (tiny Llama: 128)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: this thread's CPU time (robust to other processes taking the core); wall: perf_counter")
    parser.add_argument("--only", default="", help="comma-separated scenarios (default: all)")
    parser.add_argument("--engine", type=int, default=0, metavar="N",
                        help="instead: N runs per mode in a real engine, op time and plan counters")
    args = parser.parse_args(argv)
    if args.engine:
        engine(args.engine)
        return 0
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    names = [s for s in args.only.split(",") if s] or SCENARIOS
    print(f"op body per step (2 hooked layers), {args.rows} requests, d={args.d}, {args.dtype}, 1 thread, "
          f"{args.clock} time")
    for name in names:
        clock = time.thread_time if args.clock == "cpu" else time.perf_counter
        times, per_step = scenario(name, args.rows, args.d, dtype, args.iters, args.repeats, clock)
        counts = "  ".join(f"{k} {v}/step" for k, v in per_step.items())
        print(f"{name:<16}{statistics.median(times):8.1f} us  (min {min(times):.1f})   {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
