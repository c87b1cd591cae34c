"""Fixtures for the vLLM edit op without vLLM: a fake runner, the per-concept reference, edits.

The unit tests (CPU, vLLM installed), the GPU check (CUDA, no vLLM) and the op-count benchmark
all exercise :mod:`erasekit.integrations.vllm_edit` against the same reference and the same
edits; keeping them here means a change to the reference is a change to every check.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import torch

from erasekit.steering.residual import AddVector, Phase, ResidualEdit, TokenLayout

#: (lengths, computed, prompt, slots) per step layout the fused plan is checked on; letters are
#: the concepts of :func:`method_edits`
PLAN_CASES = {
    # prefill, decode and a mixed chunk (recompute after preemption) side by side
    "mixed": ([1, 3, 3, 1, 2], [5, 0, 3, 7, 0], [4, 3, 5, 2, 2],
              {0: frozenset("ak"), 1: frozenset("ap"), 2: frozenset("abkmp"), 4: frozenset("bm")}),
    # the benchmark's pattern: odd slots toggled, some with two concepts (union with gaps)
    "decode_half": ([1] * 16, [9] * 16, [4] * 16, {i: frozenset("ak" if i % 4 == 1 else "abk") for i in range(1, 16, 2)}),
    # the same with constant (add_vector) concepts only: the layer is its adds and nothing else
    "decode_half_constant": ([1] * 16, [9] * 16, [4] * 16,
                             {i: frozenset("a" if i % 4 == 1 else "ab") for i in range(1, 16, 2)}),
    # every row toggled: the contiguous in-place path, one concept on every other row
    "decode_all": ([1] * 8, [9] * 8, [4] * 8, {i: frozenset("abk" if i % 2 else "ak") for i in range(8)}),
    # long prefill chunks next to an untoggled decode row: unions above _SMALL_UNION rows, with a gap
    "long_prefill": ([200, 150, 1, 120], [0, 0, 9, 0], [200, 150, 3, 120],
                     {0: frozenset("akm"), 1: frozenset("bp"), 3: frozenset("abkmp")}),
    # long contiguous union with partial concepts (constant edits by index_add_)
    "long_contiguous": ([200, 150, 120], [0, 0, 0], [200, 150, 120],
                        {0: frozenset("akm"), 1: frozenset("bp"), 2: frozenset("abkmp")}),
}


class FakeBatch:
    """The three fields of vLLM's ``InputBatch`` the eraser reads."""

    def __init__(self, lengths: list[int], computed: list[int], prompt: list[int]) -> None:
        self.num_reqs = len(lengths)
        self.num_computed_tokens_cpu = np.array(computed)
        self.num_prompt_tokens = np.array(prompt)


def fake_runner(lengths: list[int], computed: list[int], prompt: list[int]) -> SimpleNamespace:
    """A model runner whose batch slot ``i`` owns ``lengths[i]`` rows this step."""
    qsl = np.zeros(len(lengths) + 4, dtype=np.int32)  # vLLM's buffer is longer than the batch
    qsl[1 : len(lengths) + 1] = np.cumsum(lengths)
    qsl[len(lengths) + 1 :] = qsl[len(lengths)]
    return SimpleNamespace(input_batch=FakeBatch(lengths, computed, prompt), query_start_loc=SimpleNamespace(np=qsl))


def reference_edit(edits: dict[str, ResidualEdit], slots: dict[int, frozenset[str]], lengths: list[int],
                   computed: list[int], prompt: list[int], layer: int, hidden: torch.Tensor,
                   residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused semantics the fused plan must reproduce bit for bit: per (concept, phase) in
    name order, gather that group's rows, edit ``hidden + residual`` with the group's own
    layout, write back ``(new, 0)``. Index tensors live on ``hidden``'s device."""
    dev = hidden.device
    qsl = np.concatenate([[0], np.cumsum(lengths)])
    groups: dict = defaultdict(list)
    for slot, concepts in slots.items():
        start, end = int(qsl[slot]), int(qsl[slot + 1])
        n_prefill = min(max(prompt[slot] - computed[slot], 0), end - start)
        parts = [(Phase.PREFILL, start, start + n_prefill), (Phase.DECODE, start + n_prefill, end)]
        for c in concepts:
            for phase, a, b in parts:
                if b > a and phase in edits[c].phases:
                    groups[(c, phase)].append((a, b))
    h, r = hidden.clone(), residual.clone()
    for c, phase in sorted(groups, key=lambda g: (g[0], g[1].value)):
        if layer not in edits[c].layers:
            continue
        segs = sorted(groups[(c, phase)])
        idx = torch.cat([torch.arange(a, b) for a, b in segs]).to(dev)
        sub_qsl = torch.tensor([0] + np.cumsum([b - a for a, b in segs]).tolist(), device=dev)
        new = edits[c].edit(layer, h[idx] + r[idx], TokenLayout.from_query_start_loc(sub_qsl),
                            torch.ones(len(idx), dtype=torch.bool, device=dev), phase)
        h[idx] = new.to(h.dtype)
        r[idx] = 0
    return h, r


def method_edits(d: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 cast_all: bool = False) -> dict[str, ResidualEdit]:
    """Seeded edits of every kind: ``a``, ``b`` constant vectors (``b`` at layer 1 only), ``k`` KIF
    (centred, with refusal), ``m`` MLLMEraser, ``p`` a prefill-only constant. ``device`` moves
    them; ``cast_all`` also casts every edit to ``dtype``, as the vLLM plugin's install does."""
    from erasekit.steering.kif import KIFEdit
    from erasekit.steering.mllmeraser import MLLMEraserEdit

    g = torch.Generator().manual_seed(0)
    kif_t = {"mean": torch.randn(2, d, generator=g), "scale": torch.rand(2, d, generator=g) + 0.5,
             "signature_z": torch.randn(2, d, generator=g), "directions": torch.randn(2, 3, d, generator=g),
             "gate_mu": torch.zeros(2), "gate_sigma": torch.ones(2), "refusal": torch.randn(2, d, generator=g),
             "residual_norm": torch.ones(2)}
    hp = {"suppression": 0.8, "gate_k": 1.6, "gate_tau": -1.0, "center": True, "refusal_strength": 0.5,
          "phases": ["prefill", "decode"]}
    edits = {
        "a": AddVector("a", {0: torch.randn(d, generator=g).to(dtype), 1: torch.randn(d, generator=g).to(dtype)}),
        "b": AddVector("b", {1: torch.randn(d, generator=g).to(dtype)}),
        "k": KIFEdit("k", (0, 1), kif_t, hp),
        "m": MLLMEraserEdit("m", (0, 1), torch.randn(2, d, generator=g), torch.randn(2, d, generator=g), -0.3),
        "p": AddVector("p", {0: torch.randn(d, generator=g).to(dtype)}, frozenset({Phase.PREFILL})),
    }
    if device is None and not cast_all:
        return edits
    return {k: e.to(device or "cpu", dtype if cast_all else None) for k, e in edits.items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern with the sign of zeros made positive. The in-place paths zero
    ``residual`` by a multiply, which leaves -0.0 where the residual was negative; the next
    layer's ``hidden + (-0.0)`` equals ``hidden`` exactly (``hidden + 0.0``, the reference's zero,
    would only turn a -0.0 hidden into +0.0), so both zeros feed it the same stream."""
    canonical = t + 0.0  # -0.0 + 0.0 == +0.0; every other value unchanged
    return canonical.view(torch.int32 if t.dtype == torch.float32 else torch.int16)
