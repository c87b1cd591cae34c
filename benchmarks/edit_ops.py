"""Aten ops per ``edit()`` call of the non-constant LLM edits (KIF, MLLMEraser), counted with
``torch.profiler`` on CPU.

On a GPU every eager op that computes is a kernel launch (~8-15 µs of host time each), so the op
count of an edit is most of its cost at decode batch sizes. ``tests/test_edit_ops.py`` asserts
upper bounds on these counts so they cannot silently grow.

    OMP_NUM_THREADS=1 python -m benchmarks.edit_ops

prints, per case, every aten op recorded (``all``: nested ones included, e.g. the ``aten::empty``
an ``aten::addmm`` allocates) and the top-level ones (``top``: what ``edit()`` itself calls), and
``compute``: the top-level ops that compute something, i.e. not a view (``slice``, ``unsqueeze``,
``select`` ...) nor a cast to the dtype a tensor already has: about the kernels a GPU launches.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from erasekit.steering.residual import Phase, ResidualEdit, TokenLayout
from erasekit.testing.vllm_edit_fixtures import method_edits as shared_method_edits

#: top-level aten ops that never launch a kernel (metadata / views only)
VIEW_OPS = frozenset({"aten::slice", "aten::select", "aten::unsqueeze", "aten::view", "aten::expand",
                      "aten::as_strided", "aten::t", "aten::transpose", "aten::reshape", "aten::alias",
                      "aten::squeeze", "aten::detach", "aten::lift_fresh", "aten::numpy_T",
                      "aten::unbind"})


def count_ops(fn: Callable[[], Any], repeat: int = 3) -> dict[str, Any]:
    """Aten ops of one ``fn()`` call (the median-free minimum over ``repeat`` profiled calls, after
    one warm-up call so lazily cached tensors are built outside the count)."""
    fn()
    best: dict[str, Any] | None = None
    for _ in range(repeat):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        events = [e for e in prof.events() if e.name.startswith("aten::")]
        ids = {e.id for e in events}
        top = [e for e in events if e.cpu_parent is None or e.cpu_parent.id not in ids]
        # a top-level op computes unless it is a view, or a dtype/device cast with nothing to do
        # (``aten::to`` without an ``aten::_to_copy`` inside)
        noop = {e.id for e in top if e.name == "aten::to" and not e.cpu_children}
        compute = [e for e in top if e.name not in VIEW_OPS and e.id not in noop]
        row = {"all": len(events), "top": len(top), "compute": len(compute),
               "ops": dict(Counter(e.name for e in compute)), "names": {e.name for e in events}}
        if best is None or row["all"] < best["all"]:
            best = row
    assert best is not None
    return best


def method_edits(d: int) -> dict[str, ResidualEdit]:
    """KIF (centred, with refusal) and MLLMEraser: the vLLM unit tests' and gpu_check's edits."""
    edits = shared_method_edits(d)
    return {"kif": edits["k"], "mllmeraser": edits["m"]}


def layouts() -> dict[str, tuple[TokenLayout, Phase]]:
    """Decode (vLLM: one row per sequence), prefill (vLLM chunk) and padded prefill (transformers)."""
    return {
        "decode": (TokenLayout.from_query_start_loc(torch.arange(5)), Phase.DECODE),
        "prefill": (TokenLayout.from_query_start_loc(torch.tensor([0, 3, 4, 9])), Phase.PREFILL),
        "padded_prefill": (TokenLayout.from_attention_mask(torch.tensor([[0, 1, 1], [1, 1, 1]])), Phase.PREFILL),
    }


def cases(d: int = 64) -> dict[str, Callable[[], Any]]:
    """``method/layout/dtype`` -> a no-argument call of that edit."""
    out: dict[str, Callable[[], Any]] = {}
    edits = method_edits(d)
    g = torch.Generator().manual_seed(1)
    for lname, (layout, phase) in layouts().items():
        n = layout.seq_index.shape[0]
        rows = layout.seq_index >= 0
        for dtype in (torch.float32, torch.bfloat16):
            hidden = torch.randn(n, d, generator=g).to(dtype)
            for mname, edit in edits.items():
                if phase not in edit.phases:
                    continue
                out[f"{mname}/{lname}/{str(dtype).removeprefix('torch.')}"] = (
                    lambda e=edit, h=hidden, lay=layout, r=rows, p=phase: e.edit(1, h, lay, r, p))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--ops", action="store_true", help="also list the top-level ops")
    args = parser.parse_args()
    for name, fn in cases(args.d).items():
        row = count_ops(fn)
        print(f"{name:36s} all={row['all']:3d} top={row['top']:3d} compute={row['compute']:3d}"
              + (f"  {row['ops']}" if args.ops else ""))


if __name__ == "__main__":
    main()
