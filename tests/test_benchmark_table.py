"""The diffusion benchmark's acceptance table: the committed table is what the committed results render
to, and an anchored concept's timing gets its own rows (its flagged calls re-encode, so they cost most)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.diffusion_erasure import acceptance, anchored_concept, markdown

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "diffusion_erasure" / "results"


class _Pack:
    def __init__(self, anchor_text: str | None) -> None:
        self.hyperparameters = {"anchor_text": anchor_text} if anchor_text else {}


def test_committed_table_is_rendered_from_committed_results():
    report = json.loads((RESULTS / "results.json").read_text())
    assert markdown(report) + "\n" == (RESULTS / "table.md").read_text()


def test_anchored_concept_is_the_first_with_anchor_text():
    packs = {c: {"cgce": _Pack(t)} for c, t in [("circle", None), ("stripes", "with a plain fill"),
                                                  ("dots", "with a plain fill")]}
    assert anchored_concept(packs, ["circle", "dots", "stripes"]) == "dots"
    assert anchored_concept(packs, ["circle"]) is None


def _timing(concept: str, benign: float, flagged: float) -> dict:
    row = {"benign_overhead": benign, "flagged_overhead": flagged}
    return {"concept": concept, "cgce": row, "cgce+irece": row,
            "onnx_detection_ms_per_prompt": {"batch_1_median": 0.03, "batch_1_median_sd15_77x768": 0.1}}


def test_anchored_timing_gets_its_own_rows():
    report = json.loads((RESULTS / "results.json").read_text())
    acc = acceptance(report["results"], _timing("circle", 0.001, 0.009), _timing("dots", 0.002, 0.061))
    assert acc["overhead_anchored_concept"] == "dots" and acc["overhead_anchored"]["cgce"]["flagged"] == 0.061
    table = markdown({**report, "acceptance": acc})
    assert "| cgce added latency, flagged prompt (circle) | ≤ 5 % | 0.9 % |" in table
    assert "| cgce added latency, flagged prompt (dots, anchor_text re-encode) | ≤ 5 % | 6.1 % |" in table
