"""Helpers shared by the IRECE tests on random joint-attention models (SD3, CogVideoX)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from erasekit.guardrails.concept import Concept
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.diffusers import guard
from erasekit.steering import irece as irece_math
from tests.test_diffusers_pipelines import BLUE, RED, SHAPES

OTHER_BLUE = "a blue star on a black background"


def red_concept() -> Concept:
    """Forget prompts all say "red", retain prompts never do."""
    forget = [f"a red {s} on a {b} background" for s in SHAPES for b in ("white", "black", "grey")]
    retain = [f"a {c} {s} on a {b} background" for c in ("blue", "green") for s in SHAPES
              for b in ("white", "black", "grey")]
    return Concept("red", forget=forget, retain=retain, keywords=["red"])


def with_hp(pack: ConceptPack, **hp) -> ConceptPack:
    return dataclasses.replace(pack, hyperparameters={**pack.hyperparameters, **hp}, source=None)


def hand_set_gate(pipe, pack: ConceptPack, run: Callable, steps: int) -> ConceptPack:
    """``pack`` with gate thresholds set by the test: at the first decision step, midway between
    the red output's probe logit and the highest benign one (after asserting the probe ranks red
    clearly above every benign output); out of reach elsewhere. ``run(g, prompts)`` calls the
    guard ``g`` with "red" toggled."""
    first: dict[tuple[str, ...], list[float]] = {}
    with guard(pipe, [pack]) as g:
        for batch in ((RED, BLUE), (BLUE, OTHER_BLUE)):
            run(g, list(batch))
            first[batch] = g.last_report.irece_gate["red"][0]  # margins at decision step 0, before any latch
    red, benign = first[(RED, BLUE)][0], max(first[(RED, BLUE)][1], *first[(BLUE, OTHER_BLUE)])
    assert red > benign + 0.5  # the probe ranks the red output clearly above every benign one
    step0 = irece_math.calibration_step(int(pack.hyperparameters["decide_start"] * steps), steps, steps)
    gate = pack.tensors["gate_threshold"] + 1e4  # out of reach, finite so margins stay comparable
    gate[step0] = pack.tensors["gate_threshold"][step0] + (red + benign) / 2
    return dataclasses.replace(pack, tensors={**pack.tensors, "gate_threshold": gate}, source=None)
