"""Shared pieces of the GPU check: a per-section recorder, device sync, interleaved paired timing."""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress line with the seconds since start, flushed at once (the run is read remotely)."""
    print(f"[gpu_check {time.perf_counter() - T0:7.1f}s] {msg}", flush=True)
    sys.stdout.flush()


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Section:
    """One section's results: named checks (pass/fail with the measured values) and numbers.

    ``run(fn)`` calls ``fn(self)``; an exception is recorded with its traceback and the section is
    marked ``error`` -- the caller goes on with the next section either way.
    """

    def __init__(self, key: str, title: str) -> None:
        self.key, self.title = key, title
        self.checks: list[dict[str, Any]] = []
        self.numbers: dict[str, Any] = {}
        self.notes: list[str] = []
        self.errors: list[dict[str, str]] = []
        self.skipped: str | None = None
        self.seconds = 0.0

    def check(self, name: str, ok: bool, expected: str = "", **values: Any) -> bool:
        ok = bool(ok)
        self.checks.append({"name": name, "ok": ok, "expected": expected, **values})
        log(f"  {self.key}: {'PASS' if ok else 'FAIL'} {name} {values if values else ''}")
        return ok

    def report(self, name: str, value: Any) -> None:
        """A measured number (not a pass/fail check)."""
        self.numbers[name] = value
        log(f"  {self.key}: {name} = {value}")

    def note(self, text: str) -> None:
        self.notes.append(text)
        log(f"  {self.key}: note: {text}")

    def guarded(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one sub-part; on failure record its traceback and return None (the section goes on)."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - recorded, never swallowed silently
            tb = traceback.format_exc()
            self.errors.append({"where": what, "error": f"{type(exc).__name__}: {exc}", "traceback": tb})
            log(f"  {self.key}: ERROR in {what}: {type(exc).__name__}: {exc}")
            print(tb, flush=True)
            return None

    def run(self, fn: Callable[[Section], Any]) -> Section:
        start = time.perf_counter()
        log(f"section {self.key}: {self.title}")
        self.guarded("section", lambda: fn(self))
        self.seconds = round(time.perf_counter() - start, 2)
        log(f"section {self.key}: {self.status} ({self.seconds} s)")
        return self

    @property
    def status(self) -> str:
        if self.skipped is not None and not self.checks:
            return "skipped"
        if self.errors:
            return "error"
        if any(not c["ok"] for c in self.checks):
            return "fail"
        return "pass" if self.checks or self.numbers else "empty"

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "status": self.status,
            "seconds": self.seconds,
            "skipped": self.skipped,
            "checks": self.checks,
            "numbers": self.numbers,
            "notes": self.notes,
            "errors": self.errors,
        }


def paired_timing(
    variants: dict[str, Callable[[], Any]],
    baseline: str | dict[str, str],
    reps: int,
    device: torch.device | str,
    warmup: int = 1,
) -> dict[str, Any]:
    """Interleaved timing: each rep runs every variant once (order rotated per rep), each timed
    between device synchronisations; ratios are variant/baseline within the same rep.

    ``baseline``: one variant every other is compared with, or ``{variant: its baseline}``.
    Returns per-variant raw seconds, median seconds, and median / min paired ratio to the baseline.
    """
    pairs = baseline if isinstance(baseline, dict) else {n: baseline for n in variants if n != baseline}
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            sync(device)
            start = time.perf_counter()
            variants[n]()
            sync(device)
            times[n].append(time.perf_counter() - start)
    out: dict[str, Any] = {
        "reps": reps,
        "baseline": baseline,
        "seconds": {n: [round(t, 6) for t in v] for n, v in times.items()},
    }
    out["median_s"] = {n: round(statistics.median(v), 6) for n, v in times.items()}
    out["median_paired_ratio"] = {}
    out["min_paired_ratio"] = {}
    out["ratio_of_best"] = {}
    for n, base in pairs.items():
        ratios = [a / b for a, b in zip(times[n], times[base], strict=True)]
        out["median_paired_ratio"][n] = round(statistics.median(ratios), 4)
        out["min_paired_ratio"][n] = round(min(ratios), 4)
        out["ratio_of_best"][n] = round(min(times[n]) / min(times[base]), 4)
    return out
