"""The one residual-stream hook abstraction every LLM method is an instance of.

Frameworks differ in how they lay out a batch: transformers hands a decoder layer a padded
``[B, T, d]`` tensor, vLLM a flat ``[N, d]`` tensor of the tokens scheduled this step. Methods
should not care, so they see a flat ``[N, d]`` view plus a :class:`TokenLayout` that says which
sequence each row belongs to and where each sequence's last token is.

Contract of :meth:`ResidualEdit.edit`:

* ``hidden`` is the *full* residual stream at the output of decoder layer ``layer`` (vLLM
  adapters pass ``hidden + residual``), one row per token.
* ``rows`` is a ``[N]`` bool mask of the token rows this concept is active for (the request
  toggled it and, where the method has a router, the router fired), or ``None`` when every row
  is (the vLLM adapter hands each edit only its own rows). Rows outside it must come
  back bit-identical; adapters only call ``edit`` when at least one row is active, so benign
  batches never reach this code at all.
* The method returns a new tensor (never edits ``hidden`` in place: frameworks may keep it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from erasekit.guardrails.pack import ConceptPack


class Phase(StrEnum):
    """Prefill processes the prompt; decode processes one generated token per sequence."""

    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class TokenLayout:
    """Where each sequence's tokens sit in a flat ``[N, d]`` hidden tensor.

    Attributes:
        seq_index: ``[N]`` int64, sequence of each row; ``-1`` marks padding rows.
        last_index: ``[B]`` int64, row of each sequence's last token in this chunk.

    Every sequence has at least one row, except in padded layouts (:meth:`from_attention_mask`),
    where a sequence with no rows has padding rows instead: so a layout with as many rows as
    sequences has one row per sequence (or padding), which :attr:`one_row_per_seq` reads from the
    shapes alone.

    The derived index tensors below are built on first use and kept with the layout (adapters
    reuse one layout for every hooked layer of a forward pass, vLLM's for every step with the same
    rows), so methods do not rebuild them per call.
    """

    seq_index: torch.Tensor
    last_index: torch.Tensor

    @property
    def num_seqs(self) -> int:
        return int(self.last_index.shape[0])

    @property
    def one_row_per_seq(self) -> bool:
        """Each row is its own sequence's only row (decode; padding rows aside), from shapes only."""
        return int(self.seq_index.shape[0]) == self.num_seqs

    @cached_property
    def row_seq(self) -> torch.Tensor:
        """``[N]`` int64 sequence of each row, padding rows mapped to sequence 0 (a gather index)."""
        return self.seq_index.clamp_min(0)

    @cached_property
    def pool_index(self) -> torch.Tensor:
        """``[N]`` int64 sequence of each row, padding rows mapped to an extra bucket ``num_seqs``
        (an ``index_add_`` index into ``num_seqs + 1`` buckets that leaves padding out)."""
        return torch.where(self.seq_index < 0, self.num_seqs, self.seq_index)

    @cached_property
    def pool_count(self) -> torch.Tensor:
        """``[num_seqs + 1]`` float32 rows per :attr:`pool_index` bucket, at least 1."""
        ones = torch.ones(self.seq_index.shape[0], dtype=torch.float32, device=self.seq_index.device)
        counts = torch.zeros(self.num_seqs + 1, dtype=torch.float32, device=self.seq_index.device)
        return counts.index_add_(0, self.pool_index, ones).clamp_min_(1.0)

    @cached_property
    def row_last(self) -> torch.Tensor:
        """``[N]`` int64 row of the last token of each row's sequence (padding: sequence 0's)."""
        return self.last_index[self.row_seq]

    @classmethod
    def from_query_start_loc(cls, query_start_loc: torch.Tensor) -> TokenLayout:
        """vLLM layout: sequence ``i`` owns rows ``qsl[i]:qsl[i+1]``."""
        qsl = query_start_loc.to(torch.int64)
        lengths = qsl[1:] - qsl[:-1]
        seqs = torch.arange(lengths.shape[0], device=qsl.device)
        return cls(seq_index=torch.repeat_interleave(seqs, lengths), last_index=qsl[1:] - 1)

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor) -> TokenLayout:
        """transformers layout: a padded ``[B, T]`` batch flattened to ``B*T`` rows.

        Works for left and right padding: the last token of a row is its last unmasked one.
        """
        mask = attention_mask.to(torch.bool)
        batch, length = mask.shape
        seqs = torch.arange(batch, device=mask.device).unsqueeze(1).expand(batch, length)
        seq_index = torch.where(mask, seqs, torch.full_like(seqs, -1)).reshape(-1)
        positions = torch.arange(length, device=mask.device).expand(batch, length)
        last_in_row = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1).clamp_min(0)
        last_index = torch.arange(batch, device=mask.device) * length + last_in_row
        return cls(seq_index=seq_index, last_index=last_index)

    def rows_for(self, seq_active: torch.Tensor) -> torch.Tensor:
        """Expand a ``[B]`` bool mask of active sequences to a ``[N]`` bool mask of rows."""
        padded = torch.cat([seq_active.to(torch.bool), seq_active.new_zeros(1, dtype=torch.bool)])
        return padded[self.seq_index]  # index -1 hits the trailing False: padding is never active


class ResidualEdit(ABC):
    """One calibrated concept's edit of the residual stream.

    Subclasses set ``concept``, ``layers`` (decoder-layer indices whose *output* they edit)
    and ``phases``; they implement :meth:`edit`. Stateless across calls: per-request state
    belongs to the adapter, so requests never see each other's state.
    """

    concept: str
    layers: tuple[int, ...]
    phases: frozenset[Phase] = frozenset({Phase.PREFILL, Phase.DECODE})

    @abstractmethod
    def edit(
        self, layer: int, hidden: torch.Tensor, layout: TokenLayout, rows: torch.Tensor | None, phase: Phase
    ) -> torch.Tensor:
        """Return the edited ``[N, d]`` residual stream (see the module docstring)."""

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ResidualEdit:
        """Move calibrated tensors; subclasses with tensors override this."""
        return self

    def constant_delta(self, layer: int) -> torch.Tensor | None:
        """``v`` if :meth:`edit` at ``layer`` is exactly ``hidden + v`` on the active rows for a
        ``v`` (``[d]``, hidden's dtype) that depends on nothing else — not the hidden state, the
        layout or the phase — else ``None`` (the default). Adapters may then add ``v`` to the
        active rows in place (one tensor op) instead of calling :meth:`edit`; the rows must come
        out bit-identical to what :meth:`edit` returns."""
        return None


def masked_add(hidden: torch.Tensor, rows: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """``hidden + delta`` on ``rows`` only (every row when ``None``); other rows come back bit-identical."""
    if rows is None:
        return hidden + delta.to(hidden.dtype)
    return torch.where(rows.unsqueeze(-1), hidden + delta.to(hidden.dtype), hidden)


class AddVector(ResidualEdit):
    """The simplest edit: add a constant vector (CAA / control vectors). Used for plumbing tests."""

    def __init__(self, concept: str, vectors: dict[int, torch.Tensor], phases: frozenset[Phase] | None = None):
        self.concept = concept
        self.vectors = dict(vectors)
        self.layers = tuple(sorted(self.vectors))
        if phases is not None:
            self.phases = phases

    def edit(self, layer, hidden, layout, rows, phase):  # noqa: D102 - documented on the base class
        return masked_add(hidden, rows, self.vectors[layer])

    def constant_delta(self, layer):  # noqa: D102 - documented on the base class
        # Only when edit() is this class's own (a subclass overriding edit may do anything).
        return self.vectors[layer] if type(self).edit is AddVector.edit else None

    def to(self, device, dtype=None):
        return AddVector(self.concept, {k: v.to(device, dtype or v.dtype) for k, v in self.vectors.items()}, self.phases)


# ---------------------------------------------------------------------------- pack -> edit
#: method name -> factory building that method's :class:`ResidualEdit` from a validated pack.
#: Method modules register here at import (next to ``register_method``), so framework adapters
#: (transformers, vLLM) turn any LLM pack into an edit without knowing which method it is.
_EDIT_FACTORIES: dict[str, Callable[[ConceptPack], ResidualEdit]] = {}


def register_edit_factory(method: str, factory: Callable[[ConceptPack], ResidualEdit]) -> None:
    """Declare how a method's packs become residual edits (call at module import)."""
    _EDIT_FACTORIES[method] = factory


def edit_from_pack(pack: ConceptPack) -> ResidualEdit:
    """Build the residual edit of any LLM-family pack (imports the method module on demand)."""
    from erasekit.errors import PackError
    from erasekit.guardrails.methods import get_method

    where = str(pack.source or f"pack {pack.name!r}")
    spec = get_method(pack.method, where=where)
    factory = _EDIT_FACTORIES.get(pack.method)
    if spec.family != "llm" or factory is None:
        raise PackError(where, "method", f"method {pack.method!r} is not a residual-stream (LLM) method",
                        "attach this pack to the framework it was calibrated for (e.g. a diffusers pipeline)")
    return factory(pack)
