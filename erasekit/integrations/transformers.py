"""transformers adapter: where residual-stream edits attach, and the drop-in guard.

Layer discovery uses what transformers 5 already declares instead of per-architecture tables:
``model.get_decoder()`` finds the language model (Llama, Qwen2, Mistral, Gemma, GPT-2, and the
``language_model`` of LLaVA / Qwen2-VL), and its ``_can_record_outputs["hidden_states"]`` names
the decoder-layer class whose outputs are the residual stream (what ``output_hidden_states``
records). Every method edits, and is calibrated on, exactly those outputs.

The guard::

    with TransformersGuard(model, packs=["packs/smollm2-harry_potter"], tokenizer=tok) as g:
        out = g.generate(**batch, erase=[["harry_potter"], []])   # row 0 erased, row 1 not

Per call, each row's active concepts are resolved through the :class:`Policy` (mandatory ∪
requested) and, for packs with a router, the router reads the row's prompt text. All of it is
decided on the host before the first forward; a call in which no row is active never reaches
an edit (hooks return ``None`` = output untouched), so benign outputs are bit-identical.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from erasekit.errors import ErasekitError, PackError
from erasekit.guardrails.faults import handle_guard_fault
from erasekit.guardrails.pack import ConceptPack
from erasekit.guardrails.policy import Policy, PolicyEntry
from erasekit.steering.residual import Phase, ResidualEdit, TokenLayout, edit_from_pack
from erasekit.steering.router import ConceptRouter

__all__ = ["TransformersGuard", "find_decoder_layers", "load_packs"]

_GUARD_ATTR = "_erasekit_guard"
logger = logging.getLogger("erasekit.transformers")


# ---------------------------------------------------------------------------- layer discovery
def _layer_class(decoder: torch.nn.Module) -> type[torch.nn.Module] | None:
    recordable = getattr(type(decoder), "_can_record_outputs", None) or {}
    target = recordable.get("hidden_states") if isinstance(recordable, Mapping) else None
    if target is None:
        return None
    return getattr(target, "target_class", target) if not isinstance(target, type) else target


def find_decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of any transformers causal or multimodal LM, in order.

    Raises :class:`ErasekitError` for a model whose decoder layers cannot be found, rather than
    guessing: an edit on the wrong module would silently do nothing.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    cls = _layer_class(decoder)
    if cls is None:
        # Fall back to the longest ModuleList of identical blocks under the decoder.
        candidates = [m for m in decoder.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
                      and len({type(x) for x in m}) == 1]
        if candidates:
            return list(max(candidates, key=len))
        raise ErasekitError(type(model).__name__, "decoder layers", "cannot find the decoder layers of this model",
                            "use a transformers causal LM or multimodal LM (Llama, Qwen2, Mistral, Gemma, GPT-2, LLaVA, Qwen2-VL)")
    layers = [m for m in decoder.modules() if isinstance(m, cls)]
    if not layers:
        raise ErasekitError(type(model).__name__, "decoder layers", f"no {cls.__name__} modules found",
                            "pass the model itself (e.g. LlamaForCausalLM), not a submodule")
    return layers


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ---------------------------------------------------------------------------- packs and policy
def load_packs(packs: Iterable[str | os.PathLike[str] | ConceptPack], model: torch.nn.Module) -> list[ConceptPack]:
    """Load (or take) packs and verify each was calibrated on ``model``."""
    loaded = []
    for item in packs:
        pack = item if isinstance(item, ConceptPack) else ConceptPack.from_pretrained(item)
        pack.check_model(model)
        loaded.append(pack)
    names = [p.name for p in loaded]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PackError("packs", dupes[0], "two packs for the same concept", "pass one pack per concept")
    return loaded


@dataclass
class _CallState:
    """Per-call (per-``generate``) state: which sequences each concept is active for."""

    seq_active: dict[str, list[bool]]
    tensors: dict[str, torch.Tensor]
    any_active: bool
    phase: Phase | None = None
    layout: TokenLayout | None = None
    rows: dict[str, torch.Tensor] | None = None
    direct: bool = False


class TransformersGuard:
    """Per-row, per-call concept erasure on a transformers model, without touching weights.

    Args:
        model: a transformers causal LM or multimodal LM (LLaVA, Qwen2-VL, ...).
        packs: pack directories or :class:`ConceptPack` objects (LLM methods).
        policy: a :class:`Policy` (or policy file path); by default every pack is optional
            except those named in ``mandatory``.
        mandatory: concepts erased on every call, whatever the request says.
        tokenizer: needed when a pack has a router and the caller passes token ids rather than
            ``prompts=``; routers read the decoded prompt text.
        attach: attach the hooks now (default) or later with :meth:`attach` / ``with``.

    Raises :class:`ErasekitError` before anything is attached for a pack made for another
    model, a pack whose layers the model does not have, or a policy naming unknown packs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        packs: Iterable[str | os.PathLike[str] | ConceptPack] | None = None,
        *,
        policy: Policy | str | os.PathLike[str] | None = None,
        mandatory: Iterable[str] = (),
        tokenizer: Any = None,
        attach: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        if isinstance(policy, str | os.PathLike):
            policy = Policy.from_file(policy)
        if packs is None:
            if policy is None:
                raise ErasekitError("guard", "packs", "no packs and no policy given", "pass packs=[...] or policy=...")
            missing = sorted(n for n, e in policy.entries.items() if e.pack is None)
            if missing:
                raise ErasekitError("guard", "policy", f"concept {missing[0]!r} has no pack path", "set pack: in the policy")
            packs = [policy.entries[n].pack for n in sorted(policy.entries)]  # type: ignore[misc]
        self.packs = {p.name: p for p in load_packs(packs, model)}
        mandatory = list(mandatory)
        if policy is None:
            unknown = sorted(set(mandatory) - set(self.packs))
            if unknown:
                raise ErasekitError("guard", "mandatory", f"concept {unknown[0]!r} has no pack",
                                    f"use one of {sorted(self.packs)}")
            policy = Policy([PolicyEntry(n, str(p.source) if p.source else None, n in mandatory)
                             for n, p in self.packs.items()])
        elif mandatory:
            raise ErasekitError("guard", "mandatory", "pass mandatory concepts in the policy, not both",
                                "mark them mandatory: true in the policy")
        missing = sorted(set(policy.concepts) - set(self.packs))
        if missing:
            raise ErasekitError("guard", "policy", f"concept {missing[0]!r} has no pack", "load its pack too")
        self.policy = policy
        #: run-time failures per concept (router errors), whatever on_error decided
        self.fault_counts: dict[str, int] = {}
        self.layers = find_decoder_layers(model)
        device = _model_device(model)
        self.edits: dict[str, ResidualEdit] = {}
        self.routers: dict[str, ConceptRouter] = {}
        for name, pack in self.packs.items():
            edit = edit_from_pack(pack)
            bad = [i for i in edit.layers if not 0 <= i < len(self.layers)]
            if bad:
                raise PackError(str(pack.source or name), "tensors.layers",
                                f"pack edits layer {bad[0]} but the model has {len(self.layers)} decoder layers",
                                "use a pack calibrated on this model")
            self.edits[name] = edit.to(device)
            router = ConceptRouter.from_pack(pack)
            if router is not None:
                self.routers[name] = router
        self._by_layer: dict[int, list[str]] = {}
        for name, edit in self.edits.items():
            for i in edit.layers:
                self._by_layer.setdefault(i, []).append(name)
        self._handles: list[Any] = []
        self._state: _CallState | None = None
        if attach:
            self.attach()

    # ------------------------------------------------------------------ attach / detach
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> TransformersGuard:
        """Register the hooks (a pre-hook on the model, a forward hook per edited layer)."""
        if self.attached:
            return self
        other = getattr(self.model, _GUARD_ATTR, None)
        if other is not None and other is not self:
            raise ErasekitError("guard", "model", "this model already has an erasekit guard attached",
                                "detach the other guard first (guard.detach() or leave its `with` block)")
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            for i in sorted(self._by_layer):
                self._handles.append(self.layers[i].register_forward_hook(self._make_layer_hook(i)))
            setattr(self.model, _GUARD_ATTR, self)
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook; the model is exactly as before (weights are never touched)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._state = None
        if getattr(self.model, _GUARD_ATTR, None) is self:
            delattr(self.model, _GUARD_ATTR)

    def __enter__(self) -> TransformersGuard:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()  # never raises, so it cannot mask the original error

    # ------------------------------------------------------------------ per-call resolution
    def resolve(self, erase: object, batch_size: int) -> list[frozenset[str]]:
        """Each row's active concepts (mandatory ∪ requested), validated by the policy.

        ``erase`` is either one toggle for every row (None, a list of names, a dict, a string)
        or a list with one toggle per row (each a list, dict or None).
        """
        per_row = (isinstance(erase, list | tuple) and len(erase) == batch_size and batch_size > 0
                   and all(x is None or isinstance(x, list | tuple | Mapping) for x in erase))
        if per_row:
            return [self.policy.resolve(x, where=f"erase[{i}]") for i, x in enumerate(erase)]  # type: ignore[arg-type]
        if isinstance(erase, list | tuple) and erase and all(isinstance(x, list | tuple | Mapping) for x in erase):
            raise ErasekitError("erase", None, f"{len(erase)} per-row toggles for a batch of {batch_size}",
                                "pass one toggle list per row, or one list of names for all rows")
        active = self.policy.resolve(erase, where="erase")
        return [active] * batch_size

    def _prompt_texts(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> list[str]:
        if input_ids is None:
            raise ErasekitError("guard", "prompts", "a pack has a router, which needs the prompt text",
                                "pass prompts=[...] (one string per row) or input_ids with tokenizer=")
        if self.tokenizer is None:
            raise ErasekitError("guard", "tokenizer", "a pack has a router, which reads the prompt text",
                                "pass tokenizer= to the guard, or prompts=[...] to generate()")
        texts = []
        for i, row in enumerate(input_ids):
            ids = row[attention_mask[i].bool()] if attention_mask is not None else row
            texts.append(self.tokenizer.decode(ids.tolist(), skip_special_tokens=True))
        return texts

    def _build_state(self, active_rows: list[frozenset[str]], prompts: Sequence[str] | None,
                     input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> _CallState:
        seq_active: dict[str, list[bool]] = {}
        texts: list[str] | None = list(prompts) if prompts is not None else None
        if texts is not None and len(texts) != len(active_rows):
            raise ErasekitError("generate", "prompts", f"{len(texts)} prompts for a batch of {len(active_rows)}",
                                "pass one prompt string per row")
        for name in self.edits:
            flags = [name in row for row in active_rows]
            if any(flags) and name in self.routers:
                if texts is None:
                    texts = self._prompt_texts(input_ids, attention_mask)
                idx = [i for i, f in enumerate(flags) if f]
                hits = self._route(name, [texts[i] for i in idx])
                for i, hit in zip(idx, hits, strict=True):
                    flags[i] = hit
            seq_active[name] = flags
        any_active = any(any(f) for f in seq_active.values())
        device = _model_device(self.model)
        tensors = {n: torch.tensor(f, dtype=torch.bool, device=device) for n, f in seq_active.items() if any(f)}
        return _CallState(seq_active, tensors, any_active)

    def _route(self, name: str, texts: list[str]) -> list[bool]:
        """Run a concept's router; if it fails, refuse the call or (``on_error: pass``) fall back."""
        router = self.routers[name]
        try:
            return router.matches_batch(texts)
        except Exception as exc:  # e.g. the router's sentence-embedding model is missing
            handle_guard_fault(self.policy, self.fault_counts, name, "router", exc, logger,
                               "restore the router model (ERASEKIT_ROUTER_MODEL)", "falling back to its keywords")
            return [router.keyword_hit(t) for t in texts]

    def active_concepts(self, erase: object = None, *, prompts: Sequence[str] | None = None,
                        input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                        ) -> list[frozenset[str]]:
        """Which concepts would be applied to each row (after policy and routers): for logging/tests."""
        batch = len(prompts) if prompts is not None else int(input_ids.shape[0])  # type: ignore[union-attr]
        state = self._build_state(self.resolve(erase, batch), prompts, input_ids, attention_mask)
        return [frozenset(n for n, f in state.seq_active.items() if f[i]) for i in range(batch)]

    # ------------------------------------------------------------------ calls
    def _run(self, fn: Any, args: tuple, kwargs: dict, erase: object, prompts: Sequence[str] | None) -> Any:
        if not self.attached:
            raise ErasekitError("guard", None, "the guard is detached", "call guard.attach() or use `with guard:`")
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        attention_mask = kwargs.get("attention_mask")
        embeds = kwargs.get("inputs_embeds")
        if input_ids is not None:
            batch = int(input_ids.shape[0])
        elif embeds is not None:
            batch = int(embeds.shape[0])
        elif prompts is not None:
            batch = len(prompts)
        else:
            raise ErasekitError("generate", "input_ids", "no input_ids or inputs_embeds", "pass the tokenized batch")
        # Everything that can fail on bad input happens here, before the first forward.
        state = self._build_state(self.resolve(erase, batch), prompts, input_ids, attention_mask)
        self._state = state
        try:
            return fn(*args, **kwargs)
        finally:
            self._state = None

    def generate(self, *args: Any, erase: object = None, prompts: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with per-row concept toggles (``erase``), resolved by the policy."""
        return self._run(self.model.generate, args, kwargs, erase, prompts)

    def __call__(self, *args: Any, erase: object = None, prompts: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """A single guarded forward pass (prefill semantics), e.g. for scoring."""
        return self._run(self.model, args, kwargs, erase, prompts)

    # ------------------------------------------------------------------ hooks
    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        state = self._state
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            return None
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        phase = Phase.PREFILL if past == 0 else Phase.DECODE
        if state is None or state.direct:
            # A direct model(...) / model.generate(...) call while attached: mandatory concepts
            # still apply (fail closed), decided at prefill and kept for the decode steps.
            if not self.policy.mandatory:
                return None
            if phase is Phase.PREFILL or state is None:
                rows = [self.policy.mandatory] * int(ref.shape[0])
                try:
                    state = self._build_state(rows, None, input_ids, kwargs.get("attention_mask"))
                except ErasekitError:  # router without text: apply the concept to every row
                    state = _CallState({n: [True] * len(rows) for n in self.policy.mandatory},
                                       {n: torch.ones(len(rows), dtype=torch.bool, device=ref.device)
                                        for n in self.policy.mandatory}, True)
                state.direct = True
                self._state = state
        if not state.any_active:
            state.phase = None
            return None
        length = int(ref.shape[1])
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            mask = torch.ones(ref.shape[0], length, dtype=torch.bool, device=ref.device)
        layout = TokenLayout.from_attention_mask(mask[:, -length:])
        state.phase = phase
        state.layout = layout
        state.rows = {n: layout.rows_for(t) for n, t in state.tensors.items()}
        return None

    def _make_layer_hook(self, index: int):
        names = tuple(self._by_layer[index])

        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            state = self._state
            if state is None or state.phase is None or state.rows is None:
                return None
            work = [n for n in names if n in state.rows and state.phase in self.edits[n].phases]
            if not work:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            batch, length, dim = hidden.shape
            flat = hidden.reshape(batch * length, dim)
            for name in work:
                flat = self.edits[name].edit(index, flat, state.layout, state.rows[name], state.phase)
            new = flat.reshape(batch, length, dim)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def __repr__(self) -> str:
        return (f"TransformersGuard(model={type(self.model).__name__}, concepts={sorted(self.packs)}, "
                f"mandatory={sorted(self.policy.mandatory)}, attached={self.attached})")
