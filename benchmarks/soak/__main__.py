"""``erasekit bench soak``: storm the OpenAI-compatible server with erasekit loaded.

    python -m benchmarks.soak                      # full: 1000 requests, 16 clients
    python -m benchmarks.soak --requests 240 --clients 16    # CI size

Writes ``benchmarks/results/soak.json`` and prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.soak.storm import PROBES, Planned, judge, plan_requests, run_storm, send

MANDATORY, OPTIONAL = "mand", ["alpha", "beta", "gamma"]


async def _references(base: str, max_tokens: int, toggles: list[str]) -> dict[tuple[str, str], str]:
    """Probe answers on a quiet engine, one request at a time."""
    refs: dict[tuple[str, str], str] = {}
    async with httpx.AsyncClient(timeout=120) as client:
        for prompt in PROBES:
            for toggle in toggles:
                out = await send(client, base, Planned("ref", "completions", prompt, toggle or None), max_tokens)
                if out.status != 200:
                    raise RuntimeError(f"reference request failed: {out}")
                refs[(prompt, toggle)] = out.text or ""
    return refs


def run(requests: int, clients: int, max_seconds: float, max_tokens: int, port: int, workdir: Path,
        seed: int = 0) -> dict:
    from erasekit.integrations.vllm_testing import vllm_server, write_world
    from erasekit.testing import save_tiny_llama

    # A wider init than the default makes greedy answers robust to batch-composition noise, so
    # a changed answer means a changed computation, not a flipped near-tie.
    model_dir = save_tiny_llama(workdir / "tiny-llama", seed=seed, initializer_range=0.1)
    world = write_world(workdir, model_dir=model_dir, seed=seed,
                        concepts={MANDATORY: {"mandatory": True}, **{c: {} for c in OPTIONAL}})
    result: dict = {"requests_planned": requests, "clients": clients, "max_tokens": max_tokens}
    plans = plan_requests(requests, seed, MANDATORY, OPTIONAL)
    server_args = ("--max-model-len", "512", "--served-model-name", "model", "--seed", "0")
    server_env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    with vllm_server(world.model_dir, world.policy_path, workdir / "server.log", server_args=server_args,
                     env=server_env, port=port) as (base, proc):
        refs = asyncio.run(_references(base, max_tokens, ["", *OPTIONAL]))
        t0 = time.perf_counter()
        outcomes = asyncio.run(run_storm(base, plans, clients, max_tokens, max_seconds))
        result["storm_seconds"] = round(time.perf_counter() - t0, 1)
        result["engine_alive_after"] = proc.poll() is None
        result["health_after"] = httpx.get(f"{base}/health", timeout=10).status_code
        after = asyncio.run(_references(base, max_tokens, [""]))
        result["probes_identical_after_storm"] = sum(after[k] == refs[k] for k in after)
    # The same model without erasekit, to know what a bypass of the mandatory concept would look like.
    with vllm_server(world.model_dir, None, workdir / "server-plain.log", server_args=server_args,
                     env=server_env, port=port) as (base, _):
        plain = asyncio.run(_references(base, max_tokens, [""]))
    unguarded = {p: plain[(p, "")] for p in PROBES}
    result["probes_changed_by_mandatory"] = sum(unguarded[p] != refs[(p, "")] for p in PROBES)
    result["probes_total"] = len(PROBES)
    figures = judge(outcomes, refs, unguarded)
    result.update(figures.as_dict())
    # vLLM does not restart a dead engine by itself: a dead engine shows up as 5xx and a failed
    # health check, and the process id stays ours only if it never exited.
    result["engine_restarts"] = 0 if result["engine_alive_after"] and result["health_after"] == 200 else 1
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="erasekit bench soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-seconds", type=float, default=900.0, help="stop sending after this long")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/soak.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="erasekit-soak-") as tmp:
        result = run(args.requests, args.clients, args.max_seconds, args.max_tokens, args.port, Path(tmp), args.seed)
    result["command"] = "python -m benchmarks.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True))
    rows = [
        ("requests sent", result["sent"]), ("concurrent clients", args.clients),
        ("2xx / 4xx / 5xx", f"{result['status_2xx']} / {result['status_4xx']} / {result['status_5xx']}"),
        ("transport errors", result["transport_errors"]), ("streamed / cancelled mid-stream",
                                                         f"{result['streamed']} / {result['cancelled']}"),
        ("engine restarts (must be 0)", result["engine_restarts"]),
        ("invalid answered 400 naming the parameter", f"{result['invalid_400_param_named']}/{result['invalid_sent']} "
                                                     f"({result['invalid_400_param_named_pct']:.1f} %)"),
        ("valid answered 2xx", f"{result['valid_2xx']}/{result['valid_sent']}"),
        ("mandatory-concept bypasses (must be 0)", result["mandatory_bypasses"]),
        ("untoggled/toggled probes identical to quiet run", f"{result['probes_identical']}/{result['probes_checked']} "
                                                           f"({result['probes_identical_pct']:.1f} %)"),
        ("probe answers the mandatory concept changes", f"{result['probes_changed_by_mandatory']}/{result['probes_total']}"),
        ("storm wall time (s)", result["storm_seconds"]),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for example in result["examples_of_failures"]:
        print("  failure:", example)
    print(f"wrote {out}")
    ok = (result["status_5xx"] == 0 and result["engine_restarts"] == 0 and result["mandatory_bypasses"] == 0
          and result["invalid_400_param_named"] == result["invalid_sent"] and result["probes_identical"] == result["probes_checked"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
