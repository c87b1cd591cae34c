"""``erasekit demo``: the main job, end to end. It grows with each capability.

Each section is a module ``erasekit/demo/<name>.py`` with ``run(report: DemoReport) -> None``.
A section whose module does not exist yet is reported as "not built yet" — never faked.
"""

from __future__ import annotations

import importlib
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

#: Demo sections in the order they run, with what each will show.
SECTIONS: dict[str, str] = {
    "packs": "concept packs and policy: save, load, refuse a tampered pack, resolve requests",
    "llm": "SmolLM2-135M: calibrate a concept, guarded vs unguarded answers, benign output identical",
    "vllm": "vLLM server on loopback with a pack: one toggled and one untoggled request",
    "diffusion": "trained diffusion world: CGCE/IRECE before/after images in a PNG grid",
}


@dataclass
class DemoReport:
    """Collects what sections print, so the same text ends up in the markdown report."""

    out_dir: Path
    lines: list[str] = field(default_factory=list)

    def section(self, title: str) -> None:
        self.lines += ["", f"## {title}", ""]
        print(f"\n=== {title} ===")

    def say(self, text: str = "") -> None:
        self.lines.append(text)
        print(text)

    def image(self, path: Path, caption: str) -> None:
        rel = path.relative_to(self.out_dir) if path.is_relative_to(self.out_dir) else path
        self.lines.append(f"![{caption}]({rel})")
        print(f"[image] {caption}: {path}")


def _put_benchmarks_on_path() -> None:
    """Sections reuse the benchmarks' calibration code, which ships with the source checkout."""
    import sys

    from erasekit.cli import _repo_root

    root = _repo_root()
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))


def run_demo(out_dir: Path, sections: list[str] | None = None) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    _put_benchmarks_on_path()
    report = DemoReport(out_dir)
    report.lines.append("# erasekit demo report")
    failed = 0
    for name, what in SECTIONS.items():
        if sections and name not in sections:
            continue
        module_name = f"erasekit.demo.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            report.section(f"{name}: not built yet")
            report.say(f"Not built yet: {what}.")
            continue
        report.section(f"{name}: {what}")
        start = time.perf_counter()
        try:
            module.run(report)
        except Exception:  # a failed section is reported, and the demo exits non-zero
            failed += 1
            report.say("FAILED:\n```\n" + traceback.format_exc() + "```")
        report.say(f"_({name} took {time.perf_counter() - start:.1f} s)_")
    path = out_dir / "report.md"
    path.write_text("\n".join(report.lines) + "\n")
    print(f"\nReport written to {path}")
    return 1 if failed else 0
