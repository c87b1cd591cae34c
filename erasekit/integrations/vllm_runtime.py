"""Worker side of the vLLM plugin: which request owns which rows, and the compile-proof edit op.

Three pieces, all inside vLLM's worker process:

* :class:`EraseLogitsProcessor` never touches logits in normal operation. vLLM calls its
  ``update_state`` with every change of the persistent batch (added / removed / moved
  requests, *before* each forward), which makes it the one reliable place to learn which batch
  slot holds which request and what that request asked for. It resolves each request's
  concepts against the policy once, when the request enters the batch, and forgets them when
  it leaves (finished or preempted).
* :func:`erasekit_edit_` is an opaque ``torch.library`` custom op. vLLM traces the model once
  and drops guards, so a plain Python hook would be frozen at trace time (when no request had
  a concept) and steering would silently vanish. An opaque op is a call the compiled graph
  makes every step, so its Python body sees the live slot table.
* :class:`EngineEraser` is what the op calls: it maps slots to token rows through the
  runner's ``query_start_loc`` and hands each concept's rows to the method's
  :class:`~erasekit.steering.residual.ResidualEdit`. Benign steps (no active slot) return
  before touching a tensor, so plain traffic is bit-identical and costs one dict check per
  hooked layer.

Nothing here may raise while serving: an exception in the worker kills the engine and every
in-flight request. Failures are counted and handled per the policy's ``on_error``: ``refuse``
ends the affected requests at once (the logits processor forces end-of-sequence), ``pass``
lets them continue unguarded.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from erasekit.errors import ErasekitError, PolicyError
from erasekit.guardrails.policy import Policy, parse_toggles
from erasekit.integrations import vllm_config as cfg
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


# ------------------------------------------------------------------------------ carrier
def _eos_of(params: Any) -> int | None:
    eos = getattr(params, "eos_token_id", None)
    if eos is None:
        eos = getattr(params, "_eos_token_id", None)
    if eos is None:
        stops = getattr(params, "all_stop_token_ids", None) or getattr(params, "_all_stop_token_ids", None)
        eos = min(stops) if stops else None
    return eos


_POLICY_CACHE: dict[str, Policy] = {}


def request_toggles(params: Any) -> object:
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(cfg.REQUEST_KEY) if isinstance(extra, dict) else None


class EraseLogitsProcessor(LogitsProcessor):
    """Admission check and per-slot concept carrier (vLLM V1 ``LogitsProcessor`` interface)."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Shape check of ``extra_args['erase']`` (the policy check is in the front-end hook).

        This runs in the API-server process before the request reaches the engine, so a
        bad toggle is an HTTP 400 naming the parameter and never reaches a worker.
        """
        from vllm.exceptions import VLLMValidationError

        value = request_toggles(sampling_params)
        try:
            toggles = parse_toggles(value, where=cfg.REQUEST_KEY)
            if len(_POLICY_CACHE) == 1:  # this process serves one policy: check names too
                next(iter(_POLICY_CACHE.values())).resolve(toggles, where=cfg.REQUEST_KEY)
        except ErasekitError as exc:
            raise VLLMValidationError(str(exc), parameter=cfg.REQUEST_KEY, value=str(value)[:200]) from None

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        section = cfg.section_from(vllm_config.additional_config)
        if section is None:
            raise PolicyError("logits_processors", "EraseLogitsProcessor", "erasekit is not configured",
                              f"set {cfg.ENV_VAR}=policy.yaml or additional_config={{'erasekit': ...}}")
        self.policy = cfg.load_policy(section)
        #: batch slot -> active concepts, only for slots with at least one concept
        self.slots: dict[int, frozenset[str]] = {}
        #: batch slot -> eos token id, for requests whose guard failed under on_error=refuse
        self.refused: dict[int, int | None] = {}
        self.errors = 0
        self.requests_guarded = 0
        #: guarded requests that re-entered the batch with output already generated (resumed
        #: after preemption with recompute): their concepts are resolved again from their params
        self.requests_resumed = 0
        self.device = device
        #: bumped on every batch change, so the eraser can reuse its row plan between changes
        self.version = 0
        #: concepts whose packs have a router (set by install(); None = none may be routed out)
        self.routed: frozenset[str] | None = None

    def is_argmax_invariant(self) -> bool:
        # apply() forces EOS for refused requests, which changes greedy results.
        return False

    def _resolve(self, params: Any) -> frozenset[str]:
        active = self.policy.resolve(request_toggles(params), where=cfg.REQUEST_KEY)
        routed_out = (getattr(params, "extra_args", None) or {}).get(cfg.ROUTED_OUT_KEY)
        if routed_out and self.routed is not None:
            # Only concepts that have a router can be routed out; never a forged name.
            active = active - (frozenset(routed_out) & self.routed)
        return active

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        self.version += 1
        try:
            for index in batch_update.removed:
                self.slots.pop(index, None)
                self.refused.pop(index, None)
            for index, params, _prompt, output in batch_update.added:
                self.slots.pop(index, None)
                self.refused.pop(index, None)
                try:
                    active = self._resolve(params)
                except Exception:  # validated at admission, so this is a bug: never raise here
                    self.note_error(index, params, "resolving the request's concepts failed")
                    continue
                if active:
                    self.slots[index] = active
                    self.requests_guarded += 1
                    if output:
                        self.requests_resumed += 1
            for a, b, direction in batch_update.moved:
                for table in (self.slots, self.refused):
                    va, vb = table.pop(a, None), table.pop(b, None)
                    if va is not None:
                        table[b] = va
                    if vb is not None and direction == MoveDirectionality.SWAP:
                        table[a] = vb
        except Exception:
            self.errors += 1
            logger.exception("erasekit: batch bookkeeping failed; guarding every slot conservatively")
            self._fail_all()

    def note_error(self, index: int, params: Any, what: str) -> None:
        self.errors += 1
        logger.error("erasekit: %s (on_error=%s, errors so far: %d)", what, self.policy.on_error, self.errors)
        if self.policy.on_error == "refuse":
            self.refused[index] = _eos_of(params)

    def _fail_all(self) -> None:
        if self.policy.on_error == "refuse":
            for index in list(self.slots):
                self.refused.setdefault(index, None)

    def fail_slots(self, slots: list[int]) -> None:
        """Called by the eraser when an edit failed for these slots this step."""
        self.errors += 1
        self.version += 1
        if self.policy.on_error == "refuse":
            for index in slots:
                self.refused.setdefault(index, None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.refused:
            return logits
        for index, eos in self.refused.items():
            if index < logits.shape[0]:
                logits[index] = float("-inf")
                logits[index, eos if eos is not None and eos < logits.shape[1] else 0] = 0.0
        return logits



# ------------------------------------------------------------------------------ eraser
@dataclass
class _Call:
    """One (concept, phase) edit at one layer, applied to the layer's union stream."""

    edit: ResidualEdit
    phase: Phase
    #: positions within the union this call edits; ``None`` = every union row
    local: torch.Tensor | None
    #: what ``edit`` sees: the union's layout (whole-union calls) or the call's own rows' layout;
    #: None for constant edits. A partial call always sees only its own rows: running it on the
    #: whole union with a row mask would change matmul shapes, hence rounding (measured: 1 ulp
    #: on KIF's projection).
    layout: TokenLayout | None
    rows: torch.Tensor | None  # [rows edit sees] bool, all True; None for constant edits
    #: ``ResidualEdit.constant_delta`` folded for this plan: ``[d]`` (whole union), ``[n_u, d]``
    #: with zero rows where the concept is off (small unions), or ``[len(local), d]`` (large ones)
    delta: torch.Tensor | None


@dataclass
class _LayerPlan:
    """Everything one hooked layer does in one step: a single gather and a single write-back of
    the union of every active concept's rows, with the calls in between."""

    index: torch.Tensor  # [n_u] int64 rows of the flat batch, ascending
    span: tuple[int, int] | None  # (a, b) when the union is the contiguous rows a:b (views, no gather)
    calls: list[_Call]
    #: ``[n_u, d]`` zeros written into ``residual`` (cheaper than index_fill_); None for big unions
    zeros: torch.Tensor | None
    #: batches of at most this many rows are summed whole, then gathered (one op fewer)
    sum_all_max_rows: int


@dataclass
class _Plan:
    layers: dict[int, _LayerPlan] = field(default_factory=dict)
    slots: list[int] = field(default_factory=list)


#: Unions up to this many rows (every decode step, short prefills) get dense per-plan tensors.
_SMALL_UNION = 256


def _ranges(segs: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in segs])


def _layout(lengths: list[int], device: torch.device) -> TokenLayout:
    sub_qsl = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
    return TokenLayout.from_query_start_loc(torch.from_numpy(sub_qsl).to(device))


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
        self.plan = _Plan()
        self._plan_key: tuple = ()
        self._plan_device: torch.device | None = None
        self._signature: tuple | None = None
        self._all_decode = False
        self.steps_edited = 0
        with _KEY_LOCK:
            self.key = next(_NEXT_KEY)
        _ENGINES[self.key] = self

    # -- per step -------------------------------------------------------------------------
    def _build_plan(self, hidden: torch.Tensor) -> _Plan:
        num_rows = hidden.shape[0]
        batch = self.runner.input_batch
        num_reqs = int(batch.num_reqs)
        qsl = self.runner.query_start_loc.np[: num_reqs + 1]
        computed = batch.num_computed_tokens_cpu
        prompt_len = batch.num_prompt_tokens
        if num_reqs == 0 or int(qsl[num_reqs]) > num_rows:
            self._plan_key, self._signature = (), None
            return _Plan()  # dummy/profile run or a layout we do not understand: touch nothing
        # Fast path: the batch did not change (no add/remove/move since the last plan), the
        # row layout is the same and every active request was already decoding, so the plan is
        # still exact (a decoding request never goes back to prefill without a batch update).
        signature = (self.carrier.version, num_reqs, qsl.tobytes())
        if signature == self._signature and self._all_decode:
            return self.plan
        segments: dict[tuple[str, Phase], list[tuple[int, int, int]]] = defaultdict(list)
        for slot, concepts in self.carrier.slots.items():
            if slot >= num_reqs or slot in self.carrier.refused:
                continue
            start, end = int(qsl[slot]), int(qsl[slot + 1])
            if end <= start:
                continue
            n_prefill = min(max(int(prompt_len[slot]) - int(computed[slot]), 0), end - start)
            parts = []
            if n_prefill:
                parts.append((Phase.PREFILL, start, start + n_prefill))
            if end - start - n_prefill:
                parts.append((Phase.DECODE, start + n_prefill, end))
            for concept in concepts:
                edit = self.edits.get(concept)
                if edit is None:
                    continue
                for phase, a, b in parts:
                    if phase in edit.phases:
                        segments[(concept, phase)].append((slot, a, b))
        self._signature = signature
        self._all_decode = all(p is Phase.DECODE for (_, p) in segments)
        key = tuple(sorted((c, p.value, tuple(sorted(segs, key=lambda x: x[1]))) for (c, p), segs in segments.items()))
        like = (hidden.device, hidden.dtype, hidden.shape[1])
        if key == self._plan_key and self._plan_device == like:
            return self.plan  # steady decode: same requests in the same slots, reuse the tensors
        plan = _Plan(slots=sorted({s for _, _, segs in key for s, _, _ in segs}))
        for layer, names in self.by_layer.items():
            # Calls in concept-name order (a row with two concepts gets them in that order, as in
            # the transformers guard); a concept's prefill and decode rows are disjoint.
            wanted = [(c, Phase(p), segs) for c, p, segs in key if c in names]
            if wanted:
                plan.layers[layer] = self._layer_plan(layer, wanted, hidden)
        self._plan_key, self._plan_device = key, like
        return plan

    def _layer_plan(self, layer: int, wanted: list, hidden: torch.Tensor) -> _LayerPlan:
        device = hidden.device
        union = sorted({(a, b) for _, _, segs in wanted for _, a, b in segs})
        index = _ranges(union)
        offset, pos = 0, {}
        for a, b in union:
            pos[(a, b)] = offset
            offset += b - a
        n_u = offset
        small = n_u <= _SMALL_UNION
        contiguous = bool(index[-1] - index[0] + 1 == n_u)
        union_layout = None  # built only if a call needs it (constant edits do not)
        calls = []
        for concept, phase, segs in wanted:
            edit = self.edits[concept]
            spans = [(pos[(a, b)], pos[(a, b)] + b - a) for _, a, b in segs]
            n_call = sum(b - a for a, b in spans)
            delta = edit.constant_delta(layer)
            if delta is not None:
                if n_call == n_u:  # every union row: one broadcast add
                    calls.append(_Call(edit, phase, None, None, None, delta))
                elif small:  # add [n_u, d] with zero rows where the concept is off: one plain add
                    mask = np.zeros((n_u, 1), dtype=bool)
                    for a, b in spans:
                        mask[a:b] = True
                    dense = torch.where(torch.from_numpy(mask).to(device), delta,
                                        torch.zeros((), dtype=delta.dtype, device=device))
                    calls.append(_Call(edit, phase, None, None, None, dense))
                else:
                    local = torch.from_numpy(_ranges(spans)).to(device)
                    calls.append(_Call(edit, phase, local, None, None, delta.expand(n_call, delta.shape[-1])))
            elif n_call == n_u:
                if union_layout is None:
                    union_layout = _layout([b - a for a, b in union], device)
                calls.append(_Call(edit, phase, None, union_layout,
                                   torch.ones(n_u, dtype=torch.bool, device=device), None))
            else:
                calls.append(_Call(edit, phase, torch.from_numpy(_ranges(spans)).to(device),
                                   _layout([b - a for a, b in spans], device),
                                   torch.ones(n_call, dtype=torch.bool, device=device), None))
        span = (int(index[0]), int(index[-1]) + 1) if contiguous else None
        zeros = hidden.new_zeros(n_u, hidden.shape[1]) if small and not contiguous else None
        return _LayerPlan(torch.from_numpy(index).to(device), span, calls, zeros, 2 * n_u)

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
            if lp.span is not None:
                # Contiguous union (e.g. every request toggled): work on views of the layer's own
                # outputs. hidden ← hidden + residual, residual ← 0 leaves the stream unchanged,
                # so a failure in a later call leaves these rows unedited, never corrupted.
                stream = hidden[lp.span[0]: lp.span[1]]
                res = residual[lp.span[0]: lp.span[1]]
                stream.add_(res)
                res.zero_()
                self._run_calls(layer, lp, stream, in_place=True)
            else:
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
        """Apply the layer's calls to the union stream ``stream`` (``[n_u, d]``) in order."""
        dtype = stream.dtype
        for call in lp.calls:
            if call.delta is not None:  # constant edit: h + v on its rows (x + 0 elsewhere), in place, one op
                if call.local is None:
                    stream.add_(call.delta)
                else:
                    stream.index_add_(0, call.local, call.delta)
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
                "requests_guarded": self.carrier.requests_guarded,
                "requests_resumed": getattr(self.carrier, "requests_resumed", 0),
                "active_slots": len(self.carrier.slots)}


# ------------------------------------------------------------------------------ install
def find_decoder_layers(model: torch.nn.Module, num_layers: int) -> tuple[str, torch.nn.ModuleList]:
    """The model's decoder-layer list: the ModuleList named ``...layers`` of the right length.

    Multimodal models are searched inside their language model (vLLM's
    ``SupportsMultiModal.get_language_model``), so a vision tower whose block list happens to have
    the text model's depth can never be hooked instead of the text stack.
    """
    root, prefix = model, ""
    get_lm = getattr(model, "get_language_model", None)
    if callable(get_lm):
        try:
            language_model = get_lm()
        except Exception:  # not a multimodal model after all (e.g. the interface's default asserts)
            language_model = None
        if isinstance(language_model, torch.nn.Module) and language_model is not model:
            root = language_model
            prefix = next((n + "." for n, m in model.named_modules() if m is language_model), "")
    candidates = [(prefix + name, m) for name, m in root.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h")
                  and len(m) == num_layers]
    if len(candidates) != 1:
        found = [(n, len(m)) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
        raise ErasekitError(type(model).__name__, "layers",
                            f"cannot find one decoder-layer list of length {num_layers} (ModuleLists: {found[:8]})",
                            "this architecture is not supported by the erasekit vLLM plugin yet; "
                            "unset ERASEKIT_CONFIG to serve it unguarded")
    return candidates[0]


def install(runner: Any) -> EngineEraser | None:
    """Attach erasekit to a freshly loaded V1 model runner; ``None`` when not configured.

    Runs inside ``load_model``, i.e. before warm-up and compilation, so the hooks (and the op
    calls they make) are part of the traced graph. Any error propagates: vLLM then fails to
    start, which is the point (fail closed).
    """
    vllm_config = runner.vllm_config
    section = cfg.section_from(vllm_config.additional_config)
    if section is None:
        return None
    config = cfg.prepare_section(section)
    carrier = _find_carrier(runner)
    packs = cfg.load_packs(config.policy)
    model_config = vllm_config.model_config
    text_config = model_config.hf_text_config
    architecture = (getattr(model_config.hf_config, "architectures", None) or ["?"])[0]
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    actual, has_hash = cfg.fingerprint_vllm_model(model, text_config, architecture)
    cfg.check_packs(packs, actual, has_hash)
    edits = {name: edit.to(runner.device, model_config.dtype) for name, edit in cfg.build_edits(packs).items()}
    wanted = sorted({layer for edit in edits.values() for layer in edit.layers})
    _, layer_list = find_decoder_layers(model, actual.num_layers)
    present = [i for i in wanted if type(layer_list[i]).__name__ != "PPMissingLayer"]
    from erasekit.steering.router import ConceptRouter

    carrier.routed = frozenset(n for n, p in packs.items() if ConceptRouter.from_pack(p) is not None)
    eraser = EngineEraser(runner, carrier, edits, present or wanted)
    from vllm.config import CompilationMode

    eager = vllm_config.compilation_config.mode == CompilationMode.NONE
    for i in present:
        layer_list[i].register_forward_hook(_make_hook(i, eraser.key, eager))
    runner._erasekit_eraser = eraser
    logger.info("erasekit: guarding %s with concepts %s (mandatory %s) at layers %s, on_error=%s",
                architecture, sorted(edits), sorted(config.policy.mandatory), present, config.policy.on_error)
    return eraser


def _find_carrier(runner: Any) -> Any:
    batch = getattr(runner, "input_batch", None)
    procs = getattr(getattr(batch, "logitsprocs", None), "all", None)
    found = list((procs() if callable(procs) else procs) or ())
    for proc in found:
        if type(proc).__name__ == "EraseLogitsProcessor":
            return proc
    configured = getattr(runner.vllm_config.model_config, "logits_processors", None)
    raise ErasekitError("vLLM engine", "logits_processors",
                        f"erasekit is configured but its request carrier (EraseLogitsProcessor) is not loaded "
                        f"(loaded: {[type(p).__name__ for p in found]}, configured: {configured}), "
                        "so per-request toggles could not be honoured (speculative decoding and pooling models "
                        "skip custom logits processors)",
                        "serve without speculative decoding, or unset ERASEKIT_CONFIG")
