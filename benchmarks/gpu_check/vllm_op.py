"""Section B: erasekit's vLLM edit op (``torch.ops.erasekit.vllm_edit_``) on the device, torch only.

No vLLM is imported: the op and :class:`EngineEraser` live in a module that imports torch, numpy
and erasekit only, and are driven here with a fake runner and carrier, as tests/test_vllm_units.py
does on the CPU.

1. The fused per-layer plan equals the group-by-group reference algorithm bit for bit (every plan
   case of the unit test, fp32 and bf16, default and forced-gather thresholds).
2. CUDA graphs, on a toy 2-layer stack with the op after each layer:
   (a) negative control -- the whole stack, op included, captured while no slot is active, then a
       slot is activated and the graph replayed: the edit is frozen out (expected), which is why
       vLLM must split its graph at the op;
   (b) piecewise -- each layer captured alone on static buffers, the op called eagerly between
       replays (vLLM's PIECEWISE mode with the op in ``splitting_ops``): slot changes from step to
       step take effect and every step equals the eager run bit for bit.
3. Op cost per call (no slot / half the rows toggled), CUDA events and host clock.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.gpu_check.common import Section, log, sync
from erasekit.testing.vllm_edit_fixtures import PLAN_CASES, bits, fake_runner, method_edits, reference_edit

OP_MODULE = "erasekit.integrations.vllm_edit"


# ------------------------------------------------------------------ fake carrier
def _carrier(slots: dict[int, frozenset[str]]) -> SimpleNamespace:
    failed: list[list[int]] = []
    return SimpleNamespace(
        slots=slots,
        refused={},
        errors=0,
        version=0,
        fail_slots=failed.append,
        failed=failed,
        requests_guarded=0,
    )




def _fused_vs_reference(sec: Section, rt: Any, device: torch.device) -> None:
    d = 16
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for masked_max in ("default", "gather"):
            saved = (rt._MASKED_MAX_ELEMS, rt._MASKED_MAX_ROWS)
            if masked_max == "gather":
                rt._MASKED_MAX_ELEMS, rt._MASKED_MAX_ROWS = 0, 0
            try:
                for case, (lengths, computed, prompt, slots) in sorted(PLAN_CASES.items()):
                    edits = method_edits(d, dtype, device)
                    carrier = _carrier(slots)
                    eraser = rt.EngineEraser(fake_runner(lengths, computed, prompt), carrier, edits, [0, 1])
                    n = sum(lengths) + 3
                    g = torch.Generator().manual_seed(1)
                    hidden = torch.randn(n, d, generator=g).to(device, dtype)
                    residual = torch.randn(n, d, generator=g).to(device, dtype)
                    h, r = hidden.clone(), residual.clone()
                    want_h, want_r = hidden, residual
                    ok = True
                    for layer in (0, 1):
                        torch.ops.erasekit.vllm_edit_(h, r, layer, eraser.key)
                        want_h, want_r = reference_edit(
                            edits, slots, lengths, computed, prompt, layer, want_h, want_r
                        )
                        ok &= torch.equal(bits(h), bits(want_h)) and torch.equal(bits(r), bits(want_r))
                    modes = sorted({lp.mode for lp in eraser.plan.layers.values()})
                    edited = bool((want_h != hidden).any())
                    padding_untouched = torch.equal(h[sum(lengths) :], hidden[sum(lengths) :])
                    good = (
                        ok
                        and not carrier.failed
                        and edited
                        and padding_untouched
                        and eraser.steps_edited == 1
                    )
                    results.append(good)
                    if not good:
                        sec.check(
                            f"fused plan == reference [{case}, {masked_max}, {dtype}]",
                            False,
                            "bit-identical",
                            bit_identical=ok,
                            failed_slots=carrier.failed,
                            edited=edited,
                            padding_untouched=padding_untouched,
                            modes=modes,
                        )
            finally:
                rt._MASKED_MAX_ELEMS, rt._MASKED_MAX_ROWS = saved
    sec.check(
        f"fused plan == group-by-group reference bit for bit on {device.type} "
        f"({len(PLAN_CASES)} cases x fp32/bf16 x default/gather)",
        all(results) and bool(results),
        "all bit-identical",
        cases_passed=sum(results),
        cases=len(results),
    )


# ------------------------------------------------------------------ CUDA graphs
class _Stack:
    """Two toy "decoder layers" returning (hidden, residual) like vLLM's, with the op after each."""

    def __init__(self, d: int, dtype: torch.dtype, device: torch.device) -> None:
        g = torch.Generator().manual_seed(3)
        self.w = [(torch.randn(d, d, generator=g) / d**0.5).to(device, dtype) for _ in range(2)]

    def layer(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(x @ self.w[i]), x * 1.0

    def full(self, x: torch.Tensor, key: int) -> torch.Tensor:
        h, r = self.layer(0, x)
        torch.ops.erasekit.vllm_edit_(h, r, 0, key)
        h, r = self.layer(1, h + r)
        torch.ops.erasekit.vllm_edit_(h, r, 1, key)
        return h + r


#: the steps of the graph experiment: all-decode batches of 8 rows (padded), slots changing per step
GRAPH_STEPS: list[tuple[int, dict[int, frozenset[str]]]] = [
    (8, {}),
    (8, {1: frozenset("a"), 3: frozenset("ak")}),
    (8, {0: frozenset("k"), 2: frozenset("abk"), 5: frozenset("b")}),
    (6, {4: frozenset("ak")}),  # 6 requests in a graph of 8 rows: 2 padding rows
    (8, {i: frozenset("a") for i in range(8)}),
    (8, {}),
]


def _graph_checks(sec: Section, rt: Any, device: torch.device, dtype: torch.dtype) -> None:
    label = str(dtype).removeprefix("torch.")
    d, rows = 64, 8
    stack = _Stack(d, dtype, device)
    edits = method_edits(d, dtype, device, cast_all=True)
    runner = fake_runner([1] * rows, [9] * rows, [4] * rows)
    carrier = _carrier({})
    eraser = rt.EngineEraser(runner, carrier, edits, [0, 1])
    key = eraser.key
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(rows, d, generator=g).to(device, dtype) for _ in GRAPH_STEPS]

    def set_step(n_reqs: int, slots: dict[int, frozenset[str]]) -> None:
        new = fake_runner([1] * n_reqs, [9] * n_reqs, [4] * n_reqs)
        runner.input_batch, runner.query_start_loc = new.input_batch, new.query_start_loc
        carrier.slots = dict(slots)
        carrier.version += 1

    # eager references, with and without the slots
    eager, plain = [], []
    for (n_reqs, slots), x in zip(GRAPH_STEPS, inputs, strict=True):
        set_step(n_reqs, slots)
        eager.append(stack.full(x.clone(), key))
        set_step(n_reqs, {})
        plain.append(stack.full(x.clone(), key))
    sync(device)
    active_steps = [i for i, (_, s) in enumerate(GRAPH_STEPS) if s]
    sec.check(
        f"graphs {label}: eager steps with slots differ from eager without",
        all(not torch.equal(eager[i], plain[i]) for i in active_steps),
        "differ",
        steps=len(active_steps),
    )

    cuda = device.type == "cuda"
    if not cuda:
        sec.note(
            f"graphs {label}: no CUDA on {device}: the whole-graph negative control is skipped and the "
            "piecewise run below replays eager pieces into static buffers (plumbing only, no CUDA graph)"
        )

    # (a) whole stack captured with the op inside while no slot is active
    if cuda:
        set_step(rows, {})
        static_x = inputs[0].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                stack.full(static_x, key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = stack.full(static_x, key)
        # "frozen": each replay equals the unedited eager run (close: replayed kernels may round
        # differently from eager ones; the edits move values by O(1)) and misses the edit
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        frozen, missed, bitwise, worst = [], [], 0, 0.0
        for i, ((n_reqs, slots), x) in enumerate(zip(GRAPH_STEPS, inputs, strict=True)):
            set_step(n_reqs, slots)
            static_x.copy_(x)
            graph.replay()
            sync(device)
            diff = float((static_out.float() - plain[i].float()).abs().max())
            worst = max(worst, diff)
            bitwise += int(torch.equal(static_out, plain[i]))
            frozen.append(diff <= tol)
            if slots:
                missed.append(float((static_out.float() - eager[i].float()).abs().max()) > 10 * tol)
        result = "frozen" if all(frozen) and all(missed) else "not frozen"
        sec.check(
            f"graphs {label}: (a) whole-stack capture incl. the op, slot activated after capture "
            "(negative control)",
            result == "frozen",
            "frozen (edit baked out: vLLM must split at the op)",
            result=result,
            replays_equal_unedited=f"{sum(frozen)}/{len(frozen)}",
            replays_bitwise_equal_unedited=f"{bitwise}/{len(frozen)}",
            max_abs_diff_to_unedited=worst,
            active_steps_missing_edit=f"{sum(missed)}/{len(missed)}",
        )

    # (b) piecewise: each layer captured alone, the op eager in between
    set_step(rows, {})
    static_x = inputs[0].clone()
    if cuda:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                h1, r1 = stack.layer(0, static_x)
                stack.layer(1, h1 + r1)
        torch.cuda.current_stream().wait_stream(side)
        g1, g2 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(g1, pool=pool):
            h1s, r1s = stack.layer(0, static_x)
        with torch.cuda.graph(g2, pool=pool):
            h2s, r2s = stack.layer(1, h1s + r1s)
        replay1, replay2 = g1.replay, g2.replay
    else:
        h1s, r1s = stack.layer(0, static_x)
        h2s, r2s = stack.layer(1, h1s + r1s)

        def replay1() -> None:
            h, r = stack.layer(0, static_x)
            h1s.copy_(h)
            r1s.copy_(r)

        def replay2() -> None:
            h, r = stack.layer(1, h1s + r1s)
            h2s.copy_(h)
            r2s.copy_(r)

    same, took_effect, worst_b = [], [], 0.0
    for i, ((n_reqs, slots), x) in enumerate(zip(GRAPH_STEPS, inputs, strict=True)):
        set_step(n_reqs, slots)
        static_x.copy_(x)
        replay1()
        torch.ops.erasekit.vllm_edit_(h1s, r1s, 0, key)
        replay2()
        torch.ops.erasekit.vllm_edit_(h2s, r2s, 1, key)
        out = h2s + r2s
        sync(device)
        same.append(torch.equal(bits(out), bits(eager[i])))
        worst_b = max(worst_b, float((out.float() - eager[i].float()).abs().max()))
        if slots:
            took_effect.append(not torch.equal(out, plain[i]))
    mode = "CUDA graphs" if cuda else "emulated (no CUDA)"
    sec.check(
        f"graphs {label}: (b) piecewise ({mode}), op eager between replays: every step == eager bit for bit",
        all(same),
        "bit-identical",
        steps_identical=f"{sum(same)}/{len(same)}",
        max_abs_diff=worst_b,
    )
    sec.check(
        f"graphs {label}: (b) piecewise: per-step slot changes take effect",
        all(took_effect),
        "all edited",
        active_steps_edited=f"{sum(took_effect)}/{len(took_effect)}",
        failed_slots=carrier.failed,
    )


# ------------------------------------------------------------------ op timing
def _time_op(
    rt: Any,
    device: torch.device,
    rows: int,
    d: int,
    dtype: torch.dtype,
    label: str,
    slots: dict[int, frozenset[str]],
    bump: bool,
    calls: int,
    kinds: str = "ak",
) -> dict[str, Any]:
    """One op-timing case: ``calls`` steps of two hooked layers on a decode batch of ``rows``."""
    cuda = device.type == "cuda"
    edits = method_edits(d, dtype, device, cast_all=True)
    edits = {k: edits[k] for k in kinds}  # "a": a constant vector, "k": KIF; layers 0 and 1
    runner = fake_runner([1] * rows, [9] * rows, [4] * rows)
    carrier = _carrier(dict(slots))
    eraser = rt.EngineEraser(runner, carrier, edits, [0, 1])
    h = torch.randn(rows, d, device=device, dtype=dtype) * 0.1
    r = torch.randn(rows, d, device=device, dtype=dtype) * 0.1
    op, key = torch.ops.erasekit.vllm_edit_, eraser.key

    def step() -> None:
        if bump:
            carrier.version += 1
        op(h, r, 0, key)
        op(h, r, 1, key)

    for _ in range(5):
        step()
    sync(device)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    host_s = time.perf_counter() - t0
    if cuda:
        end.record()
    sync(device)
    total_s = time.perf_counter() - t0
    row = {
        "rows": rows,
        "d": d,
        "dtype": str(dtype).removeprefix("torch."),
        "case": label,
        "us_per_call_host_enqueue": round(host_s / (2 * calls) * 1e6, 2),
        "us_per_call_wall_synced": round(total_s / (2 * calls) * 1e6, 2),
        "failed_slots": len(carrier.failed),
        **{
            k: v for k, v in eraser.stats().items() if k in ("plans_checked", "plans_built", "plans_recalled")
        },
    }
    if cuda:
        row["us_per_call_cuda_events"] = round(start.elapsed_time(end) * 1e3 / (2 * calls), 2)
    return row


def _op_timing(sec: Section, rt: Any, device: torch.device, quick: bool) -> None:
    configs = [(16, 576, torch.bfloat16), (256, 4096, torch.bfloat16), (256, 4096, torch.float32)]
    if quick:
        configs = configs[:1]
    calls = 50 if quick else 300
    out = []
    for rows, d, dtype in configs:
        half = {i: frozenset("ak" if i % 4 == 1 else "a") for i in range(1, rows, 2)}
        half_a = {i: frozenset("a") for i in range(1, rows, 2)}
        for label, slots, bump, kinds in (
            ("no_slot", {}, False, "ak"),
            ("half_toggled_add_vector_only", half_a, False, "a"),
            ("half_toggled", half, False, "ak"),
            ("half_toggled_batch_changed_every_step", half, True, "ak"),
        ):
            row = _time_op(rt, device, rows, d, dtype, label, slots, bump, calls, kinds)
            out.append(row)
            log(f"  B: op timing {row}")
    sec.report("op timing per call (2 hooked layers per step, calls = steps x 2)", out)
    sec.check("op timing ran without failed slots", all(r["failed_slots"] == 0 for r in out), "0 failed")


def run(sec: Section, device: torch.device, quick: bool) -> None:
    name = OP_MODULE
    sec.report("op module", name)
    import subprocess
    import sys

    # in a fresh interpreter where ``import vllm`` fails: the module must not need it
    code = (
        f"import sys; sys.modules['vllm'] = None; import {name}; import torch; torch.ops.erasekit.vllm_edit_"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    sec.check(
        "op module imports with vllm blocked (fresh interpreter)",
        proc.returncode == 0,
        "exit 0",
        returncode=proc.returncode,
        stderr_tail=proc.stderr[-400:],
    )
    rt = importlib.import_module(name)
    sec.guarded("fused plan vs reference", lambda: _fused_vs_reference(sec, rt, device))
    for dtype in (torch.float32, torch.bfloat16):
        sec.guarded(f"cuda graphs {dtype}", lambda dtype=dtype: _graph_checks(sec, rt, device, dtype))
    sec.guarded("op timing", lambda: _op_timing(sec, rt, device, quick))
