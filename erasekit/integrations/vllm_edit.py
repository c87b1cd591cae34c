"""Worker-side edit machinery of the vLLM plugin: the compile-proof edit op and the step plan.

This module imports torch, numpy and erasekit only (never ``vllm``), so a machine with torch but
no vLLM can import it and exercise the op, plan building and CUDA-graph behaviour with a fake
runner and carrier (see ``tests/test_vllm_units.py``). :mod:`erasekit.integrations.vllm_runtime`
holds the vLLM-facing pieces (the logits-processor carrier, ``install``).

* :func:`erasekit_edit_` is an opaque ``torch.library`` custom op. vLLM traces the model once
  and drops guards, so a plain Python hook would be frozen at trace time (when no request had
  a concept) and steering would silently vanish. An opaque op is a call the compiled graph
  makes every step, so its Python body sees the live slot table.
* :class:`EngineEraser` is what the op calls: it maps slots to token rows through the
  runner's ``query_start_loc`` and hands each concept's rows to the method's
  :class:`~erasekit.steering.residual.ResidualEdit`. Benign steps (no active slot) return
  before touching a tensor, so plain traffic is bit-identical and costs one dict check per
  hooked layer.

What the eraser needs, by duck typing (no vLLM types):

* ``runner.input_batch`` with ``num_reqs``, ``num_prompt_tokens`` and
  ``num_computed_tokens_cpu`` (numpy, per batch slot); ``runner.query_start_loc.np`` (numpy,
  at least ``num_reqs + 1`` entries).
* ``carrier.slots`` (batch slot -> frozenset of concept names), ``carrier.refused`` (slot ->
  eos id), ``carrier.version`` (bumped on every batch change), ``carrier.fail_slots(slots)``,
  ``carrier.errors`` and ``carrier.requests_guarded`` (read by ``stats()``).

Nothing here may raise while serving: an exception in the worker kills the engine and every
in-flight request. A failed edit is reported to the carrier (``fail_slots``), which handles it
per the policy's ``on_error``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from erasekit.steering.residual import Phase, ResidualEdit, TokenLayout

logger = logging.getLogger("erasekit.vllm")

#: engine key -> live eraser; the op receives the key as a plain int baked into the graph.
_ENGINES: dict[int, EngineEraser] = {}
_NEXT_KEY = iter(range(1, 1 << 30))
_KEY_LOCK = threading.Lock()


# ------------------------------------------------------------------------------ the op
def erasekit_edit_(hidden: torch.Tensor, residual: torch.Tensor, layer: int, engine: int) -> None:
    """Apply every active concept's edit at ``layer`` to the rows of the requests that asked.

    vLLM decoder layers return ``(hidden, residual)`` whose sum is the residual stream. Edited
    rows are written as ``hidden = new stream, residual = 0`` so the next layer's fused
    add+norm sees the edited stream exactly; other rows are not written at all.
    """
    eraser = _ENGINES.get(engine)
    if eraser is not None and eraser.carrier.slots:
        eraser.apply(layer, hidden, residual)


# Registered with a bare ``torch.library.Library`` rather than ``torch.library.custom_op``: the
# latter's Python dispatch wrapper costs ~40 µs per call, paid at every hooked layer of every
# step even for benign traffic; a direct CompositeExplicitAutograd kernel costs a few µs.
_LIB = torch.library.Library("erasekit", "FRAGMENT")
_LIB.define("vllm_edit_(Tensor(a!) hidden, Tensor(b!) residual, int layer, int engine) -> ()")
_LIB.impl("vllm_edit_", erasekit_edit_, "CompositeExplicitAutograd")
_LIB._register_fake("vllm_edit_", lambda hidden, residual, layer, engine: None)


def _make_hook(layer: int, engine: int, eager: bool):
    """The layer hook. Compiled engines must go through the opaque op; eager ones skip the
    dispatcher and return at once when no slot is active (benign traffic costs one dict check)."""
    eraser = _ENGINES[engine]

    def compiled_hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if not (isinstance(output, tuple) and len(output) == 2 and output[1] is not None):
            return output  # unsupported layout: install() refuses such models up front
        hidden, residual = output
        torch.ops.erasekit.vllm_edit_(hidden, residual, layer, engine)
        return hidden, residual

    def eager_hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if eraser.carrier.slots and isinstance(output, tuple) and len(output) == 2 and output[1] is not None:
            eraser.apply(layer, output[0], output[1])
        return None

    return eager_hook if eager else compiled_hook


# ------------------------------------------------------------------------------ eraser
#: How a layer plan reaches the rows it edits (see :class:`_LayerPlan`).
_BLOCK, _MASKED, _GATHER = 0, 1, 2


@dataclass
class _Call:
    """One (concept, phase) edit at one layer, applied to the layer's working tensor: the union
    stream, as views of a block of rows (_BLOCK, _MASKED) or gathered (_GATHER)."""

    edit: ResidualEdit
    phase: Phase
    #: non-constant calls on part of the working tensor: their positions in it; else None
    local: torch.Tensor | None
    #: what ``edit`` sees: the union's layout (whole-union calls) or the call's own rows' layout;
    #: None for constant edits. A partial call always sees only its own rows: running it on the
    #: whole union with a row mask would change matmul shapes, hence rounding (measured: 1 ulp
    #: on KIF's projection).
    layout: TokenLayout | None
    rows: torch.Tensor | None  # always None: the edit sees only its own rows, all active
    #: constant edits: ``ResidualEdit.constant_delta(layer)``, ``[d]``; else None
    delta: torch.Tensor | None
    #: constant edits on some working rows only: ``[rows, 1]``, 1 on the call's rows, 0 elsewhere.
    #: The edit is then ``addcmul_(mask, delta)``: ``x + 1 * v`` is exactly ``x + v`` and
    #: ``x + 0 * v`` is ``x``, so no ``[rows, d]`` tensor is built per plan. None: every working row
    #: (a broadcast ``add_``).
    mask: torch.Tensor | None = None


@dataclass
class _LayerPlan:
    """Everything one hooked layer does in one step.

    Every mode first makes the union of the active rows hold the true stream
    (``hidden + residual``, ``residual = 0``), then runs the calls on it:

    * ``_BLOCK``: the union is the contiguous rows ``lo:hi``; views, in place.
    * ``_MASKED``: the union has gaps but the block ``0:hi`` is small or dense enough; in place on
      its views, ``hidden += residual * keep`` and ``residual *= 1 - keep`` with ``keep`` 1 on
      union rows. Rows of the block outside the union get ``hidden + residual * 0`` and
      ``residual * 1``: their values (and bits, but for the sign of a zero) are unchanged.
    * ``_GATHER``: large sparse unions (long prefills); gather ``hidden + residual`` once, run
      the calls, write back ``hidden = new, residual = 0`` once.
    """

    mode: int
    lo: int
    hi: int
    calls: list[_Call]
    #: ``(mask, delta)`` of every call when all are constant edits (the layer is then one in-place
    #: op per call and nothing else); None otherwise
    adds: tuple[tuple[torch.Tensor | None, torch.Tensor], ...] | None
    #: _MASKED: ``[hi, 1]`` 1 on union rows, 0 elsewhere, and ``1 - keep`` (hidden's dtype)
    keep: torch.Tensor | None = None
    drop: torch.Tensor | None = None
    #: _GATHER: ``[n_u]`` int64 rows of the flat batch, ascending
    index: torch.Tensor | None = None
    #: _GATHER: ``[n_u, d]`` zeros written into ``residual`` (cheaper than index_fill_); a view of
    #: one shared zero block; None for big unions
    zeros: torch.Tensor | None = None
    #: _GATHER: batches of at most this many rows are summed whole, then gathered (one op fewer)
    sum_all_max_rows: int = 0


@dataclass
class _Plan:
    layers: dict[int, _LayerPlan] = field(default_factory=dict)
    slots: list[int] = field(default_factory=list)


#: _GATHER unions up to this many rows zero ``residual`` by index_copy_ from the shared zero block.
_SMALL_UNION = 256
#: A union with gaps is edited in place on the block ``0:hi`` of rows up to its last one (_MASKED)
#: when that block has at most _MASKED_MAX_ELEMS elements (rows x hidden size), or at most
#: _MASKED_MAX_ROWS rows of which at least a quarter are in the union; else it is gathered
#: (_GATHER). Measured on CPU, fp32, 1 thread, two hooked layers, one constant concept: the masked
#: path took about half the time of gather + scatter for every size tried with half the rows
#: toggled (16-256 rows x d 128-4096), and for 1/8 or 1/32 toggled up to 256 x 128; gathering won
#: for 1/8 and 1/32 toggled from 64 x 2048 up.
_MASKED_MAX_ELEMS = 1 << 16
_MASKED_MAX_ROWS = 256
#: Plans kept by layout (the active slots' rows, phases and concepts), least recently used dropped
#: first: a layout seen again (e.g. a batch size coming back while every request carries the same
#: concepts) reuses its tensors instead of building them. Plans hold row masks and indices but no
#: ``[rows, d]`` tensor of their own, so this costs little memory.
_PLAN_CACHE = 32


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The rows of the segments ``starts[i]:ends[i]``, concatenated (int64)."""
    lengths = ends - starts
    before = np.cumsum(lengths) - lengths
    return np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _mark(row: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
    """``row[starts[i]:ends[i]] = 1`` for every i (slices for few segments, one scatter for many)."""
    if len(starts) <= 32:
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            row[a:b] = 1.0
    else:
        row[_ranges(starts, ends)] = 1.0


def _layout(lengths: np.ndarray, device: torch.device) -> TokenLayout:
    sub_qsl = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    return TokenLayout.from_query_start_loc(torch.from_numpy(sub_qsl).to(device))


class _Geometry:
    """Where one list of (concept, phase) row groups sits in a step: the union, the mode, and the
    row tensors the calls need, built once and shared by every layer that edits those groups.

    ``groups``: ``((concept, phase), starts, ends)``, each group's row segments as ascending
    arrays; two groups' segments are either the same (same request and phase) or disjoint. The
    masks come from one host matrix of row membership (a row per group, a column per batch row
    up to the last edited one), converted to a tensor once.
    """

    def __init__(self, groups: list, hidden: torch.Tensor, zeros: Any) -> None:
        self.device, self.dtype, self.d = hidden.device, hidden.dtype, hidden.shape[1]
        self.groups = groups
        n_groups = len(groups)
        lo, hi = min(int(g[1][0]) for g in groups), max(int(g[2][-1]) for g in groups)
        member = np.zeros((n_groups + 2, hi), dtype=np.float32)  # + keep, drop (_MASKED)
        for i, (_, a, b) in enumerate(groups):
            _mark(member[i], a, b)
        union = member[0]
        for i in range(1, n_groups):
            union = np.maximum(union, member[i])
        self.n_u = n_u = np.count_nonzero(union)
        if n_u == hi - lo:
            self.mode, self.width, masks = _BLOCK, n_u, member[:n_groups, lo:hi]
        elif hi * self.d <= _MASKED_MAX_ELEMS or (hi <= _MASKED_MAX_ROWS and 4 * n_u >= hi):
            # the block starts at row 0, so a block ending at the batch's last row needs no views
            self.mode, self.width, lo = _MASKED, hi, 0
            member[-2] = union
            member[-1] = 1.0 - union
            masks = member
        else:
            self.mode, self.width = _GATHER, n_u
            self.rows = np.flatnonzero(union)
            masks = member[:n_groups, self.rows]
        self.lo, self.hi = lo, hi
        self.counts = masks[:n_groups].sum(axis=1).astype(np.int64).tolist()
        self._host = masks  # [groups (+ 2), width]: 1 where a row is the group's (the union's)
        self._zeros = zeros
        self._masks: tuple[torch.Tensor, ...] | None = None
        self._cache: dict[Any, Any] = {}

    def _all_masks(self) -> tuple[torch.Tensor, ...]:
        """Each group's ``[width, 1]`` row mask, then (_MASKED) keep and drop, in hidden's dtype."""
        if self._masks is None:
            host = np.ascontiguousarray(self._host)[..., None]
            self._masks = torch.from_numpy(host).to(self.device, self.dtype).unbind(0)
        return self._masks

    def _cached(self, key: Any, make: Any) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value

    def _union_segments(self) -> tuple[np.ndarray, np.ndarray]:
        """The union's segments (one per request and phase), ascending."""
        starts, first = np.unique(np.concatenate([g[1] for g in self.groups]), return_index=True)
        return starts, np.concatenate([g[2] for g in self.groups])[first]

    def layer_plan(self, layer: int, edits: dict[str, ResidualEdit]) -> _LayerPlan:
        device, width = self.device, self.width
        calls = []
        for i, ((concept, phase), a, b) in enumerate(self.groups):
            edit = edits[concept]
            delta = edit.constant_delta(layer)
            if delta is not None:  # one in-place op; no per-plan [rows, d] tensor
                calls.append(_Call(edit, phase, None, None, None, delta,
                                   None if self.counts[i] == width else self._all_masks()[i]))
            elif self.counts[i] == width:  # the whole working tensor is the union (never _MASKED)
                def whole() -> tuple:
                    starts, ends = self._union_segments()
                    return _layout(ends - starts, device)
                # rows=None: every row of the working tensor (spares the edit a full-tensor where)
                calls.append(_Call(edit, phase, None, self._cached("union", whole), None, None))
            else:
                def own(i=i, a=a, b=b) -> tuple:
                    local = np.flatnonzero(self._host[i])
                    return torch.from_numpy(local).to(device), _layout(b - a, device)
                local, layout = self._cached(i, own)
                calls.append(_Call(edit, phase, local, layout, None, None))
        adds = tuple((c.mask, c.delta) for c in calls) if all(c.delta is not None for c in calls) else None
        lp = _LayerPlan(self.mode, self.lo, self.hi, calls, adds)
        if self.mode == _MASKED:
            masks = self._all_masks()
            lp.keep, lp.drop = masks[-2], masks[-1]
        elif self.mode == _GATHER:
            lp.index = self._cached("index", lambda: torch.from_numpy(self.rows).to(device))
            lp.zeros = self._zeros(self.n_u) if self.n_u <= _SMALL_UNION else None
            lp.sum_all_max_rows = 2 * self.n_u
        return lp


class EngineEraser:
    """Per-engine runtime: edits, layer map, and the step plan built from the carrier's slots."""

    def __init__(self, runner: Any, carrier: Any, edits: dict[str, ResidualEdit], layers: list[int]) -> None:
        self.runner = runner
        self.carrier = carrier
        self.edits = edits
        self.first_layer = min(layers)
        self.by_layer: dict[int, list[str]] = defaultdict(list)
        for name in sorted(edits):
            for layer in edits[name].layers:
                self.by_layer[layer].append(name)
        #: each concept's phases in the order its calls run (a concept's phase groups are disjoint)
        self._phases = {name: sorted(edit.phases, key=lambda p: p.value) for name, edit in edits.items()}
        self.plan = _Plan()
        self._plan_key: tuple = ()
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()
        self._zero_block: torch.Tensor | None = None
        self._signature: tuple | None = None
        self._all_decode = False
        self.steps_edited = 0
        #: plan bookkeeping (exported by stats()): steps whose layout changed (the plan's key was
        #: derived again), steps that then built new plan tensors, steps that found the layout
        #: among the recent plans, and the time spent in those steps' planning (ns)
        self.plans_checked = 0
        self.plans_built = 0
        self.plans_recalled = 0
        self.plan_ns = 0
        with _KEY_LOCK:
            self.key = next(_NEXT_KEY)
        _ENGINES[self.key] = self

    # -- per step -------------------------------------------------------------------------
    def _build_plan(self, hidden: torch.Tensor) -> _Plan:
        num_rows = hidden.shape[0]
        batch = self.runner.input_batch
        num_reqs = int(batch.num_reqs)
        qsl = self.runner.query_start_loc.np[: num_reqs + 1]
        if num_reqs == 0 or int(qsl[num_reqs]) > num_rows:
            self._plan_key, self._signature = (), None
            return _Plan()  # dummy/profile run or a layout we do not understand: touch nothing
        # Fast path: the batch did not change (no add/remove/move since the last plan), the
        # row layout is the same and every active request was already decoding, so the plan is
        # still exact (a decoding request never goes back to prefill without a batch update).
        signature = (self.carrier.version, num_rows, qsl.tobytes())
        if signature == self._signature and self._all_decode:
            return self.plan
        t0 = time.perf_counter_ns()
        try:
            return self._rebuild(hidden, signature, num_reqs, qsl, batch)
        finally:
            self.plans_checked += 1
            self.plan_ns += time.perf_counter_ns() - t0

    def _rebuild(self, hidden: torch.Tensor, signature: tuple, num_reqs: int, qsl: np.ndarray, batch: Any) -> _Plan:
        """The plan for this step's layout: the current one when the active rows did not change
        (only untoggled requests joined, left or moved), a recent one for a layout seen again, or a
        new one."""
        slots, refused = self.carrier.slots, self.carrier.refused
        active = np.array(sorted(s for s in slots if s < num_reqs and s not in refused), dtype=np.int64)
        starts, ends = qsl[active].astype(np.int64), qsl[active + 1].astype(np.int64)
        n_prefill = (batch.num_prompt_tokens[active] - batch.num_computed_tokens_cpu[active]).astype(np.int64)
        n_prefill = np.minimum(np.maximum(n_prefill, 0), ends - starts)
        if not (ends > starts).all():  # a slot with no rows this step
            keep = ends > starts
            active, starts, ends, n_prefill = active[keep], starts[keep], ends[keep], n_prefill[keep]
        concepts = [slots[s] for s in active.tolist()]
        key = (active.tobytes(), starts.tobytes(), ends.tobytes(), n_prefill.tobytes(), tuple(concepts),
               hidden.device, hidden.dtype, hidden.shape[1])
        self._signature = signature
        self._all_decode = not n_prefill.any()
        if key == self._plan_key:
            return self.plan  # same active rows (e.g. an untoggled request joined, left or moved)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            self.plans_recalled += 1
        else:
            plan = self._new_plan(hidden, active, starts, ends, n_prefill, concepts)
            self._plans[key] = plan
            if len(self._plans) > _PLAN_CACHE:
                self._plans.popitem(last=False)
            self.plans_built += 1
        self._plan_key = key  # only once the plan exists: a failed build is retried next step
        return plan

    def _new_plan(self, hidden: torch.Tensor, active: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                  n_prefill: np.ndarray, concepts: list[frozenset[str]]) -> _Plan:
        mid = starts + n_prefill
        # per phase: which entries have rows in it, and those rows' segments
        phases = {Phase.PREFILL: (n_prefill > 0, starts, mid), Phase.DECODE: (ends > mid, mid, ends)}
        used = np.zeros(len(active), dtype=bool)
        groups = []  # ((concept, phase), starts, ends), concept-name order, then phase
        for concept in sorted(frozenset().union(*concepts)):
            edit = self.edits.get(concept)
            if edit is None:
                continue
            carries = np.fromiter((concept in s for s in concepts), dtype=bool, count=len(concepts))
            for phase in self._phases[concept]:
                has_rows, a, b = phases[phase]
                chosen = carries & has_rows
                if np.count_nonzero(chosen):
                    groups.append(((concept, phase), a[chosen], b[chosen]))
                    used |= chosen
        plan = _Plan(slots=active[used].tolist())
        # Calls in concept-name order (a row with two concepts gets them in that order, as in the
        # transformers guard); a concept's prefill and decode rows are disjoint.
        shapes: dict[tuple, _Geometry] = {}  # layers editing the same groups share rows and masks
        for layer, names in self.by_layer.items():
            wanted = [g for g in groups if g[0][0] in names]
            if wanted:
                which = tuple(g[0] for g in wanted)
                geo = shapes.get(which)
                if geo is None:
                    geo = shapes[which] = _Geometry(wanted, hidden, self._zeros_for(hidden))
                plan.layers[layer] = geo.layer_plan(layer, self.edits)
        return plan

    def _zeros_for(self, hidden: torch.Tensor) -> Any:
        """``rows -> [rows, d]`` zeros, views of one block shared by every plan (never written)."""
        def zeros(rows: int) -> torch.Tensor:
            block = self._zero_block
            if (block is None or block.shape[0] < rows or block.shape[1] != hidden.shape[1]
                    or block.dtype != hidden.dtype or block.device != hidden.device):
                block = self._zero_block = hidden.new_zeros(max(rows, 16), hidden.shape[1])
            return block[:rows]
        return zeros

    def apply(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """Edit ``hidden``/``residual`` in place for this layer. Never raises."""
        try:
            if layer == self.first_layer:
                self.plan = self._build_plan(hidden)
                if self.plan.layers:
                    self.steps_edited += 1
            lp = self.plan.layers.get(layer)
            if lp is None:
                return
            if lp.mode != _GATHER:
                # In place on views of the layer's own outputs (rows lo:hi). Afterwards the union's
                # rows hold hidden + residual and 0, which leaves the stream unchanged, so a failure
                # in a later call leaves these rows unedited, never corrupted.
                if lp.lo or lp.hi != hidden.shape[0]:
                    hidden, residual = hidden[lp.lo: lp.hi], residual[lp.lo: lp.hi]
                if lp.mode == _BLOCK:
                    hidden.add_(residual)
                    residual.zero_()
                else:  # _MASKED: x + r * 1 on union rows, x + r * 0 = x elsewhere; r * 0 there, r * 1 elsewhere
                    hidden.addcmul_(residual, lp.keep)
                    residual.mul_(lp.drop)
                if lp.adds is not None:
                    for mask, delta in lp.adds:
                        if mask is None:
                            hidden.add_(delta)
                        else:
                            hidden.addcmul_(mask, delta)
                else:
                    self._run_calls(layer, lp, hidden, in_place=True)
                return
            if hidden.shape[0] <= lp.sum_all_max_rows:  # mostly toggled: sum all, gather once
                stream = torch.add(hidden, residual).index_select(0, lp.index)
            else:
                stream = hidden.index_select(0, lp.index).add_(residual.index_select(0, lp.index))
            stream = self._run_calls(layer, lp, stream, in_place=False)
            hidden.index_copy_(0, lp.index, stream)
            if lp.zeros is not None:
                residual.index_copy_(0, lp.index, lp.zeros)
            else:
                residual.index_fill_(0, lp.index, 0)
        except Exception:
            slots = self.plan.slots
            logger.exception("erasekit: edit at layer %d failed for batch slots %s", layer, slots)
            try:
                self.carrier.fail_slots(list(slots))
            except Exception:  # pragma: no cover - last line of defence
                pass

    @staticmethod
    def _run_calls(layer: int, lp: _LayerPlan, stream: torch.Tensor, in_place: bool) -> torch.Tensor:
        """Apply the layer's calls to its working tensor ``stream`` in order."""
        dtype = stream.dtype
        for call in lp.calls:
            if call.delta is not None:  # constant edit: x + v on its rows, x + 0 * v = x elsewhere
                if call.mask is None:
                    stream.add_(call.delta)
                else:
                    stream.addcmul_(call.mask, call.delta)
            elif call.local is None:
                new = call.edit.edit(layer, stream, call.layout, call.rows, call.phase).to(dtype)
                if in_place:
                    stream.copy_(new)
                else:
                    stream = new
            else:
                sub = stream.index_select(0, call.local)
                new = call.edit.edit(layer, sub, call.layout, call.rows, call.phase).to(dtype)
                stream.index_copy_(0, call.local, new)
        return stream

    def stats(self) -> dict[str, int]:
        return {"engine": self.key, "steps_edited": self.steps_edited, "errors": self.carrier.errors,
                "plans_checked": self.plans_checked, "plans_built": self.plans_built,
                "plans_recalled": self.plans_recalled, "plan_us": self.plan_ns // 1000,
                "requests_guarded": self.carrier.requests_guarded,
                "requests_resumed": getattr(self.carrier, "requests_resumed", 0),
                "requests_readded": getattr(self.carrier, "requests_readded", 0),
                "active_slots": len(self.carrier.slots)}
