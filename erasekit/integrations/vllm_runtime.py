"""Worker side of the vLLM plugin: which request owns which rows, and where the hooks attach.

* :class:`EraseLogitsProcessor` never touches logits in normal operation. vLLM calls its
  ``update_state`` with every change of the persistent batch (added / removed / moved
  requests, *before* each forward), which makes it the one reliable place to learn which batch
  slot holds which request and what that request asked for. It resolves each request's
  concepts against the policy once, when the request enters the batch, and forgets them when
  it leaves (finished or preempted).
* :func:`install` attaches the edit op's hooks (:mod:`erasekit.integrations.vllm_edit`, which
  holds the op, the step plan and :class:`EngineEraser`, and imports no vLLM) to the loaded model.

Nothing here may raise while serving: an exception in the worker kills the engine and every
in-flight request. Failures are counted and handled per the policy's ``on_error``: ``refuse``
ends the affected requests at once (the logits processor forces end-of-sequence), ``pass``
lets them continue unguarded.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from erasekit.errors import ErasekitError, PolicyError
from erasekit.guardrails.policy import Policy, parse_toggles
from erasekit.integrations import vllm_config as cfg
from erasekit.integrations.vllm_edit import EngineEraser, _make_hook, erasekit_edit_

__all__ = ["EngineEraser", "EraseLogitsProcessor", "erasekit_edit_", "find_decoder_layers", "install",
           "release_output_token_ids", "request_toggles"]

logger = logging.getLogger("erasekit.vllm")

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
#: marks a remembered request that was not refused (a refused one stores its eos id, maybe None)
_NOT_REFUSED = object()
#: requests remembered after leaving the batch (least recently removed forgotten first)
_RECENT_MAX = 4096


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
        #: guarded requests that re-entered the batch to recompute output already generated
        #: (resumed after preemption with recompute)
        self.requests_resumed = 0
        #: re-entries of a request the carrier still remembers (same params object): pipeline
        #: parallelism takes every request out of a rank's batch and puts it back each step, and
        #: a preempted request comes back the same way; its concepts (and refusal) are recalled,
        #: not resolved or counted again
        self.requests_readded = 0
        #: batch slot -> (params, active concepts) of every request whose concepts resolved
        self._requests: dict[int, tuple[Any, frozenset[str]]] = {}
        #: id(params) -> (params, concepts, eos if refused else _NOT_REFUSED), for requests that left
        self._recent: OrderedDict[int, tuple[Any, frozenset[str], Any]] = OrderedDict()
        #: the runner's input batch (set by install()), to tell a resume with recompute from a re-add
        self.batch_of: Callable[[], Any] | None = None
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
                self._forget(index)
            #: slot -> output tokens of guarded requests that came back with output: resumed with
            #: recompute, or only re-added (checked once the moves are applied)
            back: dict[int, Any] = {}
            for index, params, _prompt, output in batch_update.added:
                self._forget(index)
                known = self._recent.pop(id(params), None)
                if known is not None and known[0] is params:  # held in _recent, so the id is not reused
                    _, active, refused = known
                    self.requests_readded += 1
                    self._requests[index] = (params, active)
                    if refused is not _NOT_REFUSED:
                        self.refused[index] = refused
                    if active:
                        self.slots[index] = active
                        if output:
                            back[index] = output
                    continue
                try:
                    active = self._resolve(params)
                except Exception:  # validated at admission, so this is a bug: never raise here
                    self.note_error(index, params, "resolving the request's concepts failed")
                    continue
                self._requests[index] = (params, active)
                if active:
                    self.slots[index] = active
                    self.requests_guarded += 1
                    if output:
                        self.requests_resumed += 1  # a request with output this carrier never saw
            for a, b, direction in batch_update.moved:
                for table in (self.slots, self.refused, self._requests, back):
                    # _NOT_REFUSED, not None, marks an empty slot: a refused slot may hold None (no eos)
                    va, vb = table.pop(a, _NOT_REFUSED), table.pop(b, _NOT_REFUSED)
                    if va is not _NOT_REFUSED:
                        table[b] = va
                    if vb is not _NOT_REFUSED and direction == MoveDirectionality.SWAP:
                        table[a] = vb
            for index, output in back.items():
                if self._recomputes(index, output):
                    self.requests_resumed += 1
        except Exception:
            self.errors += 1
            logger.exception("erasekit: batch bookkeeping failed; guarding every slot conservatively")
            self._fail_all()

    def _forget(self, index: int) -> None:
        """Slot ``index`` is vacated: remember its request (concepts, refusal) for a re-add."""
        self.slots.pop(index, None)
        refused = self.refused.pop(index, _NOT_REFUSED)
        entry = self._requests.pop(index, None)
        if entry is not None:
            params, active = entry
            self._recent[id(params)] = (params, active, refused)
            self._recent.move_to_end(id(params))
            if len(self._recent) > _RECENT_MAX:
                self._recent.popitem(last=False)

    def _recomputes(self, index: int, output: Any) -> bool:
        """Whether the request re-added at ``index`` recomputes tokens it had already computed
        (resumed after preemption), rather than going on from where it left the batch (pipeline
        parallelism). Without the runner's batch (unit tests), every return with output counts."""
        batch = self.batch_of() if self.batch_of is not None else None
        if batch is None:
            return True
        computed = int(batch.num_computed_tokens_cpu[index])
        return computed < int(batch.num_prompt_tokens[index]) + len(output) - 1

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
    release_output_token_ids(runner.input_batch, carrier)
    carrier.batch_of = lambda: getattr(runner, "input_batch", None)
    eraser = EngineEraser(runner, carrier, edits, present or wanted)
    from vllm.config import CompilationMode

    eager = vllm_config.compilation_config.mode == CompilationMode.NONE
    for i in present:
        layer_list[i].register_forward_hook(_make_hook(i, eraser.key, eager))
    runner._erasekit_eraser = eraser
    logger.info("erasekit: guarding %s with concepts %s (mandatory %s) at layers %s, on_error=%s",
                architecture, sorted(edits), sorted(config.policy.mandatory), present, config.policy.on_error)
    return eraser


def release_output_token_ids(batch: Any, carrier: Any) -> bool:
    """Tell vLLM that no custom logits processor reads ``sampling_metadata.output_token_ids``
    when the carrier is the only custom one; True when the flag was cleared.

    vLLM cannot know what a custom logits processor reads, so loading one sets
    ``InputBatch.logitsprocs_need_output_token_ids``, and every step then hands the processors
    the output token lists; under async scheduling (vLLM's GPU default) that means waiting for
    the previous step's sampled tokens to reach the host and patching each request's list in a
    Python loop, before sampling, every step, with or without toggles. The carrier reads only the
    ``BatchUpdate`` (its own references, never the sampling metadata), and the built-in
    processors never set the flag, so it is cleared unless another custom processor is loaded.
    """
    if not getattr(batch, "logitsprocs_need_output_token_ids", False):
        return False
    others = [p for p in _loaded_logitsprocs(batch) if p is not carrier
              and not type(p).__module__.startswith("vllm.v1.sample.logits_processor.builtin")]
    if others:
        return False
    batch.logitsprocs_need_output_token_ids = False
    return True


def _loaded_logitsprocs(batch: Any) -> list[Any]:
    """The logits processors the runner's input batch holds (``logitsprocs.all``, a property or a method)."""
    procs = getattr(getattr(batch, "logitsprocs", None), "all", None)
    return list((procs() if callable(procs) else procs) or ())


def _find_carrier(runner: Any) -> Any:
    found = _loaded_logitsprocs(getattr(runner, "input_batch", None))
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
