"""Throughput cost of the erasekit vLLM plugin, measured against stock vLLM in one run.

    python -m benchmarks.vllm_overhead [--model tiny|smollm2] [--eager] [--reps 5]
    python -m benchmarks.vllm_overhead --sweep 32,64 --sweep-max-tokens 64,256 [--sweep-varied]
    erasekit bench vllm [same options]

Two engines with identical settings live side by side in this process: stock vLLM (the
erasekit plugin is excluded from its processes with ``VLLM_PLUGINS``) and vLLM with erasekit
configured. Repetitions are interleaved (stock, erasekit-no-toggles, erasekit-half-toggled, ...)
so load from other processes on the machine hits every mode alike; medians are reported as
ratios to stock. The transformers guard runs the same prompts (batched, left-padded) on the
same weights and packs for the last column. ``--sweep`` adds concurrency points (stock vs
half toggled vs the transformers guard, same prompts, same token counts, greedy), optionally
with varied per-request lengths (``--sweep-varied``: lengths spread over [max/4, max], as real
traffic has; vLLM stops each request at its own length, a batched ``generate`` runs the whole
batch to the longest and only the requested tokens are counted). Output: a table on stdout and
``benchmarks/results/vllm_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

RESULTS = Path(__file__).resolve().parent.parent / "results" / "vllm_overhead.json"
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a steam engine works.",
    "List some facts about the planet Mars.",
    "Describe the rules of chess to a beginner.",
    "What makes bread rise when it is baked?",
    "Summarise the plot of a detective novel.",
    "Give advice to someone learning to cook.",
    "Describe a walk through an autumn forest.",
]


def _prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + f" (variant {i})" for i in range(n)]


def _half(n: int) -> list[str | None]:
    """Half the requests toggled: every odd one, every other of those with both concepts."""
    return ["alpha" if i % 4 == 1 else "alpha,beta" if i % 4 == 3 else None for i in range(n)]


def _engine(model_dir: Path, policy: Path | None, eager: bool, max_num_seqs: int):
    from vllm import LLM

    kwargs = {"additional_config": {"erasekit": {"policy": str(policy)}}} if policy else {}
    saved = os.environ.get("VLLM_PLUGINS")
    if policy is None:
        os.environ["VLLM_PLUGINS"] = "none-stock-run"  # the plugin is not even loaded in stock's processes
    try:
        return LLM(model=str(model_dir), dtype="float32" if "tiny" in model_dir.name else "bfloat16",
                   max_model_len=512, gpu_memory_utilization=0.2, enforce_eager=eager, seed=0,
                   max_num_seqs=max_num_seqs, **kwargs)
    finally:
        if saved is None:
            os.environ.pop("VLLM_PLUGINS", None)
        else:
            os.environ["VLLM_PLUGINS"] = saved


def _lengths(n: int, max_tokens: int, varied: bool) -> list[int]:
    """Per-request output lengths: all ``max_tokens``, or spread evenly over [max/4, max]."""
    if not varied or n == 1:
        return [max_tokens] * n
    low = max(1, max_tokens // 4)
    return [low + (max_tokens - low) * ((i * 7) % n) // (n - 1) for i in range(n)]


def _run(llm, prompts, toggles, max_tokens: int | list[int]) -> tuple[float, int]:
    from vllm import SamplingParams

    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True,
                             extra_args={"erase": t} if t else None) for t, m in zip(toggles, lengths, strict=True)]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def _transformers_guard(model_dir: Path, policy: Path, prompts, toggles, max_tokens: int | list[int],
                        reps: int) -> float:
    """Tokens/s of the transformers guard: one batched, left-padded greedy ``generate`` per rep.

    With per-request lengths the batch runs to the longest (``generate`` has no per-row budget)
    and only the requested tokens count, which is what a user batching requests gets."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from erasekit.integrations.transformers import TransformersGuard

    dtype = torch.float32 if "tiny" in model_dir.name else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(prompts, return_tensors="pt", padding=True)
    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    longest = max(lengths)
    rates = []
    with TransformersGuard(model, policy=str(policy), tokenizer=tok) as guard:
        for _ in range(reps):
            start = time.perf_counter()
            out = guard.generate(**batch, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                                 erase=[t.split(",") if t else [] for t in toggles], pad_token_id=tok.pad_token_id)
            elapsed = time.perf_counter() - start
            assert out.shape[1] - batch["input_ids"].shape[1] == longest
            rates.append(sum(lengths) / elapsed)
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vllm_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--eager", action="store_true", help="enforce_eager=True (default: torch.compile on)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--hf-reps", type=int, default=2)
    parser.add_argument("--layers", default="1,2", help="decoder layers the packs edit (comma-separated)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--sweep", default="", help="extra concurrency points, e.g. 32,64 (stock, half toggled, "
                        "transformers guard at each); engines then use max_num_seqs = the largest")
    parser.add_argument("--sweep-max-tokens", default="", help="output lengths for the sweep (default --max-tokens)")
    parser.add_argument("--sweep-varied", action="store_true",
                        help="also run every sweep point with per-request lengths spread over [max/4, max]")
    parser.add_argument("--sweep-reps", type=int, default=3)
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()
    sweep_n = [int(x) for x in args.sweep.split(",") if x]
    sweep_t = [int(x) for x in args.sweep_max_tokens.split(",") if x] or [args.max_tokens]
    sweep_points = [(n, t, v) for n in sweep_n for t in sweep_t for v in ([False, True] if args.sweep_varied else [False])]

    from tqdm import tqdm

    from erasekit.integrations.vllm_plugin import register
    from erasekit.integrations.vllm_testing import write_world

    # Load the plugin in this (front-end) process now: vLLM loads general plugins once per
    # process, and the stock engine below is created with the plugin excluded.
    register()

    root = Path(tempfile.mkdtemp(prefix="erasekit-vllm-bench-"))
    model_dir = None
    if args.model == "smollm2":
        from erasekit.testing import smollm2_dir

        model_dir = smollm2_dir()
    layers = [int(x) for x in args.layers.split(",")]
    world = write_world(root, model_dir=model_dir, concepts={"alpha": {"layers": layers}, "beta": {"layers": layers}},
                        norm=2.0)
    prompts = _prompts(args.requests)
    none = [None] * len(prompts)
    half = _half(len(prompts))
    full = ["alpha,beta"] * len(prompts)
    max_num_seqs = max([args.requests, *sweep_n])

    print(f"starting engines ({args.model}, {'eager' if args.eager else 'torch.compile'}) ...", file=sys.stderr)
    t0 = time.perf_counter()
    stock = _engine(world.model_dir, None, args.eager, max_num_seqs)
    guarded = _engine(world.model_dir, world.policy_path, args.eager, max_num_seqs)
    startup = time.perf_counter() - t0

    modes = {"stock": (stock, none), "erasekit_no_toggles": (guarded, none),
             "erasekit_half_toggled": (guarded, half), "erasekit_all_toggled": (guarded, full)}
    for llm, toggles in modes.values():  # warm-up
        _run(llm, prompts, toggles, 8)
    rates: dict[str, list[float]] = {m: [] for m in modes}
    names = list(modes)
    for rep in tqdm(range(args.reps), desc="interleaved reps", file=sys.stderr):
        for mode in names[rep % len(names):] + names[: rep % len(names)]:  # rotate the order every rep
            llm, toggles = modes[mode]
            elapsed, tokens = _run(llm, prompts, toggles, args.max_tokens)
            rates[mode].append(tokens / elapsed)
    sweep = []
    for n, t, varied in tqdm(sweep_points, desc="sweep", file=sys.stderr):
        p, toggles, lengths = _prompts(n), _half(n), _lengths(n, t, varied)
        point = {"requests": n, "max_tokens": t, "varied_lengths": varied, "tokens": sum(lengths),
                 "stock": [], "erasekit_half_toggled": []}
        for rep in range(args.sweep_reps):
            order = [("stock", stock, [None] * n), ("erasekit_half_toggled", guarded, toggles)]
            for mode, llm, tg in order[rep % 2:] + order[: rep % 2]:
                elapsed, tokens = _run(llm, p, tg, lengths)
                assert tokens == sum(lengths)
                point[mode].append(round(tokens / elapsed, 1))
        sweep.append(point)
    stock.llm_engine.engine_core.shutdown()
    guarded.llm_engine.engine_core.shutdown()

    print("running the transformers guard on the same prompts ...", file=sys.stderr)
    hf_rate = _transformers_guard(world.model_dir, world.policy_path, prompts, half, args.max_tokens, args.hf_reps)
    for point in tqdm(sweep, desc="sweep: transformers guard", file=sys.stderr):
        n = point["requests"]
        lengths = _lengths(n, point["max_tokens"], point["varied_lengths"])
        hf = _transformers_guard(world.model_dir, world.policy_path, _prompts(n), _half(n), lengths, args.hf_reps)
        point["transformers_guard_half_toggled"] = round(hf, 1)
        med = {m: statistics.median(point[m]) for m in ("stock", "erasekit_half_toggled")}
        point["ratio_half_toggled_paired_median"] = round(statistics.median(
            a / b for a, b in zip(point["erasekit_half_toggled"], point["stock"], strict=True)), 4)
        point["vllm_half_toggled_over_transformers_guard"] = round(med["erasekit_half_toggled"] / hf, 2)
        point["stock_vllm_over_transformers_guard"] = round(med["stock"] / hf, 2)

    median = {m: statistics.median(v) for m, v in rates.items()}
    best = {m: max(v) for m, v in rates.items()}
    # Other jobs share this machine, so single reps swing by 2x; the robust statistics are the
    # median of per-rep ratios (modes measured seconds apart) and the ratio of best reps.
    paired = {m: statistics.median(a / b for a, b in zip(v, rates["stock"], strict=True)) for m, v in rates.items()}
    base = median["stock"]
    result = {
        "command": "python -m benchmarks.vllm_overhead " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "compile": not args.eager, "requests": args.requests, "max_tokens": args.max_tokens,
        "reps": args.reps, "edited_layers": layers, "engine_startup_s_both": round(startup, 1),
        "tokens_per_s_median": {m: round(v, 1) for m, v in median.items()},
        "tokens_per_s_all": {m: [round(x, 1) for x in v] for m, v in rates.items()},
        "ratio_of_medians": {m: round(v / base, 4) for m, v in median.items()},
        "ratio_paired_median": {m: round(v, 4) for m, v in paired.items()},
        "ratio_of_best": {m: round(v / best["stock"], 4) for m, v in best.items()},
        "transformers_guard_half_toggled_tokens_per_s": round(hf_rate, 1),
        "vllm_half_toggled_over_transformers_guard": round(median["erasekit_half_toggled"] / hf_rate, 2),
        "transformers_guard_settings": "same process, after both vLLM engines shut down; same prompts and packs, "
                                       "same dtype, batched generate (all requests in one batch, left-padded), greedy, "
                                       "min_new_tokens = max_new_tokens = the longest request; tokens/s counts the "
                                       "requested tokens only",
        "engine_max_num_seqs": max_num_seqs,
        "sweep": sweep,
        "goals": {"no_toggles": 0.99, "half_toggled": 0.97, "vs_transformers_guard": 5.0},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_at_start": load_at_start,
                    "load_avg_at_end": os.getloadavg(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nvLLM overhead ({args.model}, {'eager' if args.eager else 'compiled'}, {args.requests} requests x "
          f"{args.max_tokens} tokens, median of {args.reps} interleaved reps)")
    print(f"{'mode':<26}{'median tok/s':>13}{'best tok/s':>12}{'paired ratio':>14}{'best ratio':>12}{'goal':>7}")
    goals = {"erasekit_no_toggles": "0.99", "erasekit_half_toggled": "0.97"}
    for mode, value in median.items():
        print(f"{mode:<26}{value:>13.1f}{best[mode]:>12.1f}{paired[mode]:>14.3f}{best[mode] / best['stock']:>12.3f}"
              f"{goals.get(mode, ''):>7}")
    print(f"{'transformers_guard (half)':<26}{hf_rate:>12.1f}{'':>9}")
    print(f"vLLM+erasekit (half toggled) / transformers guard: {median['erasekit_half_toggled'] / hf_rate:.1f}x "
          f"(goal >= 5x)")
    if sweep:
        print(f"\nsweep (half toggled; median of {args.sweep_reps} reps, transformers guard {args.hf_reps} rep(s))")
        print(f"{'requests':>8}{'max_tok':>8}{'lengths':>9}{'stock':>9}{'erasekit':>10}{'paired':>8}"
              f"{'hf guard':>10}{'vLLM+ek/hf':>12}")
        for pt in sweep:
            print(f"{pt['requests']:>8}{pt['max_tokens']:>8}{'varied' if pt['varied_lengths'] else 'equal':>9}"
                  f"{statistics.median(pt['stock']):>9.0f}{statistics.median(pt['erasekit_half_toggled']):>10.0f}"
                  f"{pt['ratio_half_toggled_paired_median']:>8.3f}{pt['transformers_guard_half_toggled']:>10.0f}"
                  f"{pt['vllm_half_toggled_over_transformers_guard']:>11.1f}x")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
