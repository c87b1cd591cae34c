"""What every ``erasekit calibrate --method ...`` reads from the command line, parsed once."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError
from erasekit.guardrails.concept import Concept


def read_prompt_file(path: str, option: str) -> list[str]:
    """Prompts from a text file, one per line; blank lines and ``#`` comments are skipped."""
    p = Path(path)
    if not p.is_file():
        raise ErasekitError(path, None, f"--{option} file does not exist",
                            f"pass a text file with one prompt per line to --{option}")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def parse_overrides(items: Sequence[str], option: str = "--set", example: str = "strength=-0.3") -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs; VALUE is JSON when it parses as JSON, else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ErasekitError(option, item[:60], "expected KEY=VALUE", f"e.g. {option} {example}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def parse_call_settings(items: Sequence[str]) -> dict[str, Any]:
    """``--call KEY=VALUE`` pairs: keyword arguments for the pipeline call made during calibration.

    Values are JSON scalars (``9``, ``6.0``, ``true``, ``null``; anything else is a string), since a
    command line cannot express tensors or callbacks; lists and objects are refused here rather
    than handed to a pipeline that would fail on them mid-calibration.
    """
    out = parse_overrides(items, "--call", "num_frames=49")
    for key, value in out.items():
        if isinstance(value, list | dict):
            raise ErasekitError("--call", key, f"value {json.dumps(value)[:60]} is not a JSON scalar",
                                f"pass one number, string, true/false or null, e.g. --call {key}=16")
        if isinstance(value, float) and not math.isfinite(value):
            raise ErasekitError("--call", key, f"value {value} is not a finite number", "pass a finite number")
    return out


def concept_from_args(args: argparse.Namespace) -> Concept:
    """The :class:`Concept` described by ``--concept/--forget/--retain/--keywords/--target``."""
    return Concept(
        name=args.concept,
        forget=read_prompt_file(args.forget, "forget"),
        retain=read_prompt_file(args.retain, "retain"),
        target=args.target,
        keywords=[k.strip() for k in (args.keywords or "").split(",") if k.strip()],
    )
