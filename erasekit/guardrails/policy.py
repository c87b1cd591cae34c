"""The operator's policy and per-request resolution of which concepts are active.

Security rule: a request may *add* optional concepts; it can never remove a mandatory one. A
request that tries is refused loudly rather than half-honoured, so a misbehaving client finds
out immediately instead of believing it switched a guard off.

Request toggles arrive in many shapes (Python lists, vLLM ``extra_args``, the server's flat
``vllm_xargs`` strings), so :func:`parse_toggles` normalises them all and :meth:`Policy.resolve`
is a pure function of (policy, request): requests cannot see each other's toggles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from erasekit.errors import PolicyError
from erasekit.guardrails.concept import CONCEPT_NAME_RE

ON_ERROR_CHOICES = ("refuse", "pass")
DEFAULT_MAX_REQUESTED = 8
#: Prefixes that mark a toggle as "disable this concept".
DISABLE_PREFIXES = ("-", "!")
_MAX_RAW_TOGGLE_CHARS = 4096


@dataclass(frozen=True)
class PolicyEntry:
    """One concept the operator serves: where its pack lives and whether it is always on."""

    concept: str
    pack: str | None = None
    mandatory: bool = False


@dataclass(frozen=True)
class Toggles:
    """A parsed request: concepts asked to be erased, and concepts asked to be left alone."""

    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()


def _err(where: str, problem: str, fix: str, field: str | None = None) -> PolicyError:
    return PolicyError(where, field, problem, fix)


def parse_toggles(value: object, where: str = "erase") -> Toggles:
    """Normalise a request's concept toggles.

    Accepted shapes: ``None``; a list/tuple of names; a dict ``{name: bool}``; a string holding
    a JSON list/dict, or comma-separated names (what fits in ``vllm_xargs``). A name prefixed
    with ``-`` or ``!`` asks to *disable* that concept.
    """
    fix = "send a list of concept names, e.g. [\"harry_potter\"] or \"harry_potter,van_gogh\""
    if value is None:
        return Toggles()
    if isinstance(value, str):
        if len(value) > _MAX_RAW_TOGGLE_CHARS:
            raise _err(where, f"value is {len(value)} characters long", fix)
        text = value.strip()
        if not text:
            raise _err(where, "empty string", "omit the parameter, or " + fix)
        if text[0] in "[{":
            try:
                value = json.loads(text)
            except (json.JSONDecodeError, RecursionError):
                raise _err(where, "string starts like JSON but is not valid JSON", fix) from None
            if isinstance(value, str):
                raise _err(where, "JSON string inside a string", fix)
            return parse_toggles(value, where)
        value = [part.strip() for part in text.split(",")]
    enable: list[str] = []
    disable: list[str] = []
    if isinstance(value, Mapping):
        for key, flag in value.items():
            if not isinstance(flag, bool):
                raise _err(where, f"value for {str(key)[:64]!r} must be true or false, got {type(flag).__name__}",
                           "send {\"concept\": true} to erase it")
            name = _check_name(key, where)
            (enable if flag else disable).append(name)
    elif isinstance(value, list | tuple):
        for item in value:
            if not isinstance(item, str):
                raise _err(where, f"list items must be strings, got {type(item).__name__}", fix)
            if item[:1] in DISABLE_PREFIXES:
                disable.append(_check_name(item[1:], where))
            else:
                enable.append(_check_name(item, where))
    else:
        raise _err(where, f"expected a list of concept names, got {type(value).__name__}", fix)
    for names in (enable, disable):
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise _err(where, f"concept {dupes[0]!r} listed more than once", "list each concept once")
    both = sorted(set(enable) & set(disable))
    if both:
        raise _err(where, f"concept {both[0]!r} both enabled and disabled", "pick one")
    return Toggles(tuple(enable), tuple(disable))


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str):
        raise _err(where, f"concept names must be strings, got {type(name).__name__}", "send strings")
    if not CONCEPT_NAME_RE.fullmatch(name):
        shown = name[:64] + ("..." if len(name) > 64 else "")
        raise _err(where, f"invalid concept name {shown!r}",
                   "use 1-64 characters from [a-z0-9_-], starting with a letter or digit")
    return name


class Policy:
    """Which concepts an operator serves, which are mandatory, and how requests add to them.

    Args:
        entries: the served concepts (``PolicyEntry`` objects, or a mapping name → dict with
            ``pack`` and ``mandatory``).
        max_requested: most optional concepts one request may ask for.
        on_error: ``"refuse"`` (default: a request whose guard cannot run is failed) or
            ``"pass"`` (it is served unguarded, with a warning and a counter).
        base_dir: relative pack paths are resolved against it (the policy file's folder).
    """

    def __init__(
        self,
        entries: Iterable[PolicyEntry] | Mapping[str, Any],
        *,
        max_requested: int = DEFAULT_MAX_REQUESTED,
        on_error: str = "refuse",
        base_dir: str | os.PathLike[str] | None = None,
        where: str = "Policy",
    ) -> None:
        if isinstance(entries, Mapping):
            entries = [_entry_from_mapping(name, spec, where) for name, spec in entries.items()]
        self.entries: dict[str, PolicyEntry] = {}
        for entry in entries:
            if not isinstance(entry, PolicyEntry):
                raise _err(where, f"expected PolicyEntry, got {type(entry).__name__}", "build entries with PolicyEntry")
            _check_name(entry.concept, f"{where}.concepts")
            if entry.concept in self.entries:
                raise _err(where, f"concept {entry.concept!r} listed twice", "list each concept once", "concepts")
            if base_dir is not None and entry.pack is not None and not os.path.isabs(entry.pack):
                entry = PolicyEntry(entry.concept, str(Path(base_dir) / entry.pack), entry.mandatory)
            self.entries[entry.concept] = entry
        if not isinstance(max_requested, int) or isinstance(max_requested, bool) or not 0 <= max_requested <= 256:
            raise _err(where, f"max_requested must be an integer in [0, 256], got {max_requested!r}",
                       "set max_requested: 8", "max_requested")
        if on_error not in ON_ERROR_CHOICES:
            raise _err(where, f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}",
                       "set on_error: refuse (fail closed) or pass", "on_error")
        self.max_requested = max_requested
        self.on_error = on_error
        self.mandatory: frozenset[str] = frozenset(n for n, e in self.entries.items() if e.mandatory)
        self.optional: frozenset[str] = frozenset(n for n, e in self.entries.items() if not e.mandatory)

    def __repr__(self) -> str:
        return (f"Policy(mandatory={sorted(self.mandatory)}, optional={sorted(self.optional)}, "
                f"max_requested={self.max_requested}, on_error={self.on_error!r})")

    @property
    def concepts(self) -> frozenset[str]:
        return self.mandatory | self.optional

    def resolve(self, requested: object = None, where: str = "erase") -> frozenset[str]:
        """Active concepts for one request: mandatory ∪ requested, after validation.

        Raises :class:`PolicyError` for unknown or malformed names, duplicates, too many
        concepts, or any attempt to disable a mandatory concept.
        """
        toggles = requested if isinstance(requested, Toggles) else parse_toggles(requested, where)
        for name in toggles.enable + toggles.disable:
            if name not in self.entries:
                known = ", ".join(sorted(self.entries)) or "none"
                raise _err(where, f"unknown concept {name!r}", f"use one of the served concepts: {known}")
        blocked = sorted(set(toggles.disable) & self.mandatory)
        if blocked:
            raise _err(where, f"concept {blocked[0]!r} is mandatory on this server and cannot be disabled",
                       "remove it from the request; the operator's policy always erases it")
        extra = [n for n in toggles.enable if n not in self.mandatory]
        if len(extra) > self.max_requested:
            raise _err(where, f"{len(extra)} optional concepts requested, at most {self.max_requested} allowed",
                       f"request at most {self.max_requested} concepts")
        return self.mandatory | frozenset(toggles.enable)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Policy:
        """Load an operator policy from YAML or JSON.

        Format::

            version: 1
            max_requested: 8
            on_error: refuse
            concepts:
              nudity:   {pack: packs/sd-nudity, mandatory: true}
              van_gogh: {pack: packs/sd-van_gogh}
        """
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise _err(where, "policy file does not exist", "check ERASEKIT_CONFIG / the path you passed")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise _err(where, f"not valid YAML/JSON ({str(exc)[:160]})", "fix the syntax") from None
        return cls.from_dict(data, base_dir=p.parent, where=where)

    @classmethod
    def from_dict(cls, data: object, base_dir: str | os.PathLike[str] | None = None, where: str = "policy") -> Policy:
        if not isinstance(data, dict):
            raise _err(where, "policy must be a mapping with a 'concepts' key", "see the README for the format")
        known = {"version", "max_requested", "on_error", "concepts"}
        unknown = sorted(set(map(str, data)) - known)
        if unknown:
            raise _err(where, "unknown field", f"use only {sorted(known)}", unknown[0])
        if data.get("version", 1) != 1:
            raise _err(where, f"unsupported policy version {data.get('version')!r}", "use version: 1", "version")
        concepts = data.get("concepts")
        if not isinstance(concepts, dict) or not concepts:
            raise _err(where, "'concepts' must be a non-empty mapping of name -> {pack, mandatory}",
                       "list at least one concept", "concepts")
        return cls(concepts, max_requested=data.get("max_requested", DEFAULT_MAX_REQUESTED),
                   on_error=data.get("on_error", "refuse"), base_dir=base_dir, where=where)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "max_requested": self.max_requested,
            "on_error": self.on_error,
            "concepts": {n: {"pack": e.pack, "mandatory": e.mandatory} for n, e in sorted(self.entries.items())},
        }


def _entry_from_mapping(name: object, spec: object, where: str) -> PolicyEntry:
    field = f"concepts.{str(name)[:64]}"
    _check_name(name, f"{where}.concepts")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise _err(where, "expected {pack: PATH, mandatory: BOOL}", "fix the entry", field)
    unknown = sorted(set(map(str, spec)) - {"pack", "mandatory"})
    if unknown:
        raise _err(where, f"unknown key {unknown[0]!r}", "use only 'pack' and 'mandatory'", field)
    pack = spec.get("pack")
    if pack is not None and not isinstance(pack, str):
        raise _err(where, "'pack' must be a path string", "set pack: path/to/pack", field)
    mandatory = spec.get("mandatory", False)
    if not isinstance(mandatory, bool):
        raise _err(where, "'mandatory' must be true or false", "set mandatory: true", field)
    return PolicyEntry(str(name), pack, mandatory)
