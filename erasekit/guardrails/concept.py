"""What the user wants erased, before any model has seen it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from erasekit.errors import ErasekitError
from erasekit.guardrails.pairs import contrast_pairs, pairs_record

#: Concept names travel in request parameters, file names and metric labels, so they are
#: restricted to a safe alphabet. They must start with a letter or digit: a leading ``-`` or
#: ``!`` in a request means "disable", which the policy parses separately.
CONCEPT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")


def validate_concept_name(name: object, where: str = "concept", field_name: str = "name") -> str:
    """Return ``name`` if it is a valid concept name, else raise :class:`ErasekitError`."""
    if not isinstance(name, str):
        raise ErasekitError(
            where, field_name, f"concept name must be a string, got {type(name).__name__}",
            "pass names like 'harry_potter' (lower-case letters, digits, '_' and '-', 1-64 chars)",
        )
    if not CONCEPT_NAME_RE.fullmatch(name):
        raise ErasekitError(
            where, field_name, f"invalid concept name {name[:80]!r}",
            "use 1-64 characters from [a-z0-9_-], starting with a letter or digit",
        )
    return name


def _as_prompt_list(value: object, field_name: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ErasekitError(
            "Concept", field_name, f"expected a list of prompt strings, got {type(value).__name__}",
            f"pass {field_name}=['prompt one', 'prompt two', ...]",
        )
    bad = [i for i, p in enumerate(value) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ErasekitError(
            "Concept", field_name, f"items {bad[:5]} are not non-empty strings",
            "remove empty or non-string items",
        )
    return tuple(value)


@dataclass(frozen=True)
class Concept:
    """A concept to erase, described by examples rather than by a definition.

    Methods calibrate from contrast: ``forget`` prompts elicit the concept, ``retain`` prompts
    are look-alikes that must keep working. ``target`` is the text a method may steer towards
    (a refusal for LLMs, an anchor such as "a painting" for diffusion), ``keywords`` feed cheap
    routers, and ``metadata`` is free-form and stored in the pack manifest as is.
    """

    name: str
    forget: tuple[str, ...] = ()
    retain: tuple[str, ...] = ()
    target: str | None = None
    keywords: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_concept_name(self.name, "Concept")
        object.__setattr__(self, "forget", _as_prompt_list(self.forget, "forget"))
        object.__setattr__(self, "retain", _as_prompt_list(self.retain, "retain"))
        object.__setattr__(self, "keywords", _as_prompt_list(self.keywords, "keywords"))
        if self.target is not None and not isinstance(self.target, str):
            raise ErasekitError("Concept", "target", "target must be a string or None", "pass target='...'")
        if not isinstance(self.metadata, dict):
            raise ErasekitError("Concept", "metadata", "metadata must be a dict", "pass metadata={...}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "forget": list(self.forget),
            "retain": list(self.retain),
            "target": self.target,
            "keywords": list(self.keywords),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_templates(cls, name: str, templates: list[str], phrases: list[str], contrasts: list[str], *,
                       n: int | None = None, seed: int = 0, keywords: tuple[str, ...] | list[str] = (),
                       target: str | None = None, metadata: dict[str, Any] | None = None) -> Concept:
        """A concept whose forget/retain prompts are minimal pairs made from ``templates`` (see
        :func:`~erasekit.guardrails.pairs.contrast_pairs`); how they were made is kept in ``metadata["pairs"]``,
        so a pack's manifest records it."""
        forget, retain = contrast_pairs(templates, phrases, contrasts, n=n, seed=seed)
        return cls(name=name, forget=forget, retain=retain, target=target, keywords=keywords,
                   metadata={**(metadata or {}), "pairs": pairs_record(templates, phrases, contrasts, n, seed)})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Concept:
        if not isinstance(data, dict):
            raise ErasekitError("Concept", None, "expected a JSON object", "pass a dict with at least 'name'")
        known = {"name", "forget", "retain", "target", "keywords", "metadata"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ErasekitError("Concept", unknown[0], "unknown field", f"use only {sorted(known)}")
        return cls(
            name=data.get("name"),  # type: ignore[arg-type]
            forget=data.get("forget", ()),
            retain=data.get("retain", ()),
            target=data.get("target"),
            keywords=data.get("keywords", ()),
            metadata=data.get("metadata", {}) or {},
        )
