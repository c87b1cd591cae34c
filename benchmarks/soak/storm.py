"""The request storm: a seeded mix of request kinds sent by concurrent clients, and the figures.

Every request is classified before it is sent, so the outcome can be judged against what it
*should* have been: valid requests must be 2xx, invalid toggles must be 400 naming the ``erase``
parameter, probes must reproduce the quiet-engine answers exactly (isolation), and no request
may ever run without the mandatory concept (bypass).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

PROBES = [
    "The quick brown fox",
    "Once upon a time there was",
    "The capital of France is",
    "In a galaxy far away,",
    "Numbers: 1, 2, 3,",
    "Dear diary, today I",
]
FILLER = ["Tell me a story about", "List three colours:", "Hello world", "Write a haiku on rain", "abc def ghi",
          "The weather tomorrow will be", "My favourite food is"]


def invalid_toggles(mandatory: str, optional: list[str]) -> list[Any]:
    """Toggles the server must refuse with a 400 naming the parameter."""
    return [
        "mickey_mouse",                              # unknown concept
        f"{optional[0]},unknown_thing",               # one unknown among valid
        "-" + mandatory,                              # disable mandatory (prefix)
        "!" + mandatory,
        json.dumps({mandatory: False}),               # disable mandatory (JSON dict in a string)
        json.dumps([optional[0], optional[0]]),       # duplicate
        ",".join(f"c{i}" for i in range(500)),        # huge list
        "Ünïcödé_ÇØÑÇËPT",                            # unicode
        "😀",
        "",                                           # empty string
        "   ",
        "[[[[not json",                               # JSON-in-string garbage
        '{"a": {"b": [1, 2, {"c": null}]}}',
        "null",
        "x" * 5000,                                   # oversized value
        "UPPER_CASE",
        7,                                            # wrong types (flat values pydantic accepts)
        True,
        3.5,
        {optional[0]: True},                          # objects: vllm_xargs takes flat values and lists only
    ]


@dataclass
class Planned:
    kind: str
    endpoint: str            # "completions" | "chat"
    prompt: str
    erase: Any = None        # None: no vllm_xargs at all
    stream: bool = False
    cancel: bool = False
    expect_status: int = 200
    probe_key: tuple[str, str] | None = None   # (prompt, canonical toggle) for isolation checks


@dataclass
class Outcome:
    planned: Planned
    status: int | None
    text: str | None = None
    error_param: str | None = None
    error_message: str | None = None
    transport_error: str | None = None
    seconds: float = 0.0


@dataclass
class StormFigures:
    sent: int = 0
    status: Counter = field(default_factory=Counter)
    transport_errors: int = 0
    invalid_sent: int = 0
    invalid_400_param_named: int = 0
    valid_sent: int = 0
    valid_2xx: int = 0
    mandatory_bypasses: int = 0
    probes_checked: int = 0
    probes_identical: int = 0
    cancelled: int = 0
    streamed: int = 0
    examples_of_failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["status"] = dict(sorted((str(k), v) for k, v in self.status.items()))
        out["status_2xx"] = sum(v for k, v in self.status.items() if k and 200 <= k < 300)
        out["status_4xx"] = sum(v for k, v in self.status.items() if k and 400 <= k < 500)
        out["status_5xx"] = sum(v for k, v in self.status.items() if k and k >= 500)
        out["invalid_400_param_named_pct"] = 100.0 * self.invalid_400_param_named / max(self.invalid_sent, 1)
        out["probes_identical_pct"] = 100.0 * self.probes_identical / max(self.probes_checked, 1)
        return out


def plan_requests(n: int, seed: int, mandatory: str, optional: list[str]) -> list[Planned]:
    rng = random.Random(seed)
    bad = invalid_toggles(mandatory, optional)
    plans: list[Planned] = []
    for _ in range(n):
        endpoint = "chat" if rng.random() < 0.3 else "completions"
        roll = rng.random()
        if roll < 0.25:       # isolation probe, no toggle (mandatory applies anyway)
            p = rng.choice(PROBES)
            plans.append(Planned("probe_plain", "completions", p, None, stream=rng.random() < 0.3,
                                 probe_key=(p, "")))
        elif roll < 0.40:     # isolation probe with one optional concept
            p, c = rng.choice(PROBES), rng.choice(optional)
            plans.append(Planned("probe_toggled", "completions", p, c, stream=rng.random() < 0.3,
                                 probe_key=(p, c)))
        elif roll < 0.55:     # valid optional toggles in the shapes clients use
            names = rng.sample(optional, rng.randint(1, len(optional)))
            shape = rng.choice(["csv", "json", "single", "list"])
            erase = {"csv": ",".join(names), "json": json.dumps(names), "single": names[0], "list": names}[shape]
            plans.append(Planned("valid_optional", endpoint, rng.choice(FILLER), erase, stream=rng.random() < 0.3))
        elif roll < 0.62:     # mandatory asked explicitly
            plans.append(Planned("mandatory_only", endpoint, rng.choice(FILLER), mandatory))
        elif roll < 0.72:     # no toggle, filler
            plans.append(Planned("plain", endpoint, rng.choice(FILLER), None, stream=rng.random() < 0.5))
        elif roll < 0.80:     # cancelled mid-stream
            plans.append(Planned("cancelled", endpoint, rng.choice(FILLER), rng.choice([None, optional[0]]),
                                 stream=True, cancel=True))
        else:                 # invalid toggles
            plans.append(Planned("invalid", endpoint, rng.choice(FILLER), rng.choice(bad), expect_status=400))
    return plans


def _body(plan: Planned, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "model", "max_tokens": max_tokens, "temperature": 0.0, "stream": plan.stream}
    if plan.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": plan.prompt}]
    else:
        body["prompt"] = plan.prompt
    if plan.erase is not None:
        body["vllm_xargs"] = {"erase": plan.erase}
    return body


async def send(client: httpx.AsyncClient, base: str, plan: Planned, max_tokens: int) -> Outcome:
    url = f"{base}/v1/chat/completions" if plan.endpoint == "chat" else f"{base}/v1/completions"
    start = time.perf_counter()
    try:
        if plan.stream:
            async with client.stream("POST", url, json=_body(plan, max_tokens)) as resp:
                if resp.status_code != 200:
                    data = json.loads(await resp.aread() or b"{}")
                    return _error_outcome(plan, resp.status_code, data, start)
                pieces: list[str] = []
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return Outcome(plan, 500, error_message=str(chunk["error"])[:200],
                                       seconds=time.perf_counter() - start)
                    choice = chunk["choices"][0] if chunk.get("choices") else {}
                    pieces.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
                    if plan.cancel and len(pieces) >= 2:
                        break  # leaving the context manager closes the stream mid-generation
                return Outcome(plan, resp.status_code, "".join(pieces), seconds=time.perf_counter() - start)
        resp = await client.post(url, json=_body(plan, max_tokens))
        data = resp.json()
        if resp.status_code != 200:
            return _error_outcome(plan, resp.status_code, data, start)
        choice = data["choices"][0]
        text = choice.get("text") if plan.endpoint == "completions" else choice["message"]["content"]
        return Outcome(plan, resp.status_code, text, seconds=time.perf_counter() - start)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        return Outcome(plan, None, transport_error=f"{type(exc).__name__}: {str(exc)[:160]}",
                       seconds=time.perf_counter() - start)


def _error_outcome(plan: Planned, status: int, data: dict[str, Any], start: float) -> Outcome:
    err = data.get("error", data) if isinstance(data, dict) else {}
    if isinstance(err, dict):
        param, message = err.get("param"), str(err.get("message", ""))
    else:
        param, message = None, str(err)
    if param is None and isinstance(data.get("detail"), list):  # FastAPI/pydantic validation errors
        locs = [".".join(map(str, d.get("loc", []))) for d in data["detail"] if isinstance(d, dict)]
        param, message = ",".join(locs), json.dumps(data["detail"])[:300]
    return Outcome(plan, status, error_param=param, error_message=message[:300], seconds=time.perf_counter() - start)


async def run_storm(base: str, plans: list[Planned], clients: int, max_tokens: int, deadline_s: float) -> list[Outcome]:
    queue: asyncio.Queue[Planned] = asyncio.Queue()
    for p in plans:
        queue.put_nowait(p)
    outcomes: list[Outcome] = []
    stop_at = time.monotonic() + deadline_s

    async def worker() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
            while time.monotonic() < stop_at:
                try:
                    plan = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                outcomes.append(await send(client, base, plan, max_tokens))

    await asyncio.gather(*(worker() for _ in range(clients)))
    return outcomes


def names_param(outcome: Outcome) -> bool:
    """A 400 'names the parameter' if its param field or message points at the erase toggle."""
    param = (outcome.error_param or "").lower()
    return "erase" in param or "vllm_xargs" in param or "erase" in (outcome.error_message or "").lower()


def judge(outcomes: list[Outcome], references: dict[tuple[str, str], str],
          unguarded: dict[str, str] | None) -> StormFigures:
    fig = StormFigures()
    for o in outcomes:
        plan = o.planned
        fig.sent += 1
        fig.status[o.status or 0] += 1
        fig.transport_errors += o.transport_error is not None
        fig.streamed += plan.stream
        fig.cancelled += plan.cancel
        if plan.kind == "invalid":
            fig.invalid_sent += 1
            ok = o.status == 400 and names_param(o)
            fig.invalid_400_param_named += ok
            if o.status is not None and 200 <= o.status < 300:
                # An invalid toggle that was served: if it tried to disable the mandatory concept
                # this is a bypass; any other is a validation hole. Both are failures.
                fig.mandatory_bypasses += "-" in str(plan.erase)[:1] or "!" in str(plan.erase)[:1] or "false" in str(plan.erase)
            if not ok and len(fig.examples_of_failures) < 10:
                fig.examples_of_failures.append(f"invalid {plan.erase!r:.60}: {o.status} {o.error_param} {o.error_message!r:.120}")
            continue
        fig.valid_sent += 1
        fig.valid_2xx += o.status is not None and 200 <= o.status < 300
        if o.status != 200 and len(fig.examples_of_failures) < 10:
            fig.examples_of_failures.append(f"{plan.kind} {plan.erase!r:.40}: {o.status} {o.transport_error} {o.error_message!r:.120}")
        if plan.probe_key and o.status == 200 and not plan.cancel:
            fig.probes_checked += 1
            same = o.text == references.get(plan.probe_key)
            fig.probes_identical += same
            if not same:
                if unguarded is not None and o.text == unguarded.get(plan.prompt) != references.get(plan.probe_key):
                    fig.mandatory_bypasses += 1
                if len(fig.examples_of_failures) < 10:
                    fig.examples_of_failures.append(f"probe {plan.probe_key}: {o.text!r:.60} != {references.get(plan.probe_key)!r:.60}")
    return fig
