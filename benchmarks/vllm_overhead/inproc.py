"""Stock vLLM vs vLLM + erasekit in one process, timed in CPU time: a load-robust A/B.

    python -m benchmarks.vllm_overhead.inproc [--reps 20] [--modes stock,none,half,all] [--front-end]

Both engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: scheduler, worker and
model on this thread), so the main thread's CPU time per run (``time.thread_time``) is the whole
engine's work, and time spent descheduled by other jobs on a loaded machine does not count. Same
workload as ``python -m benchmarks.vllm_overhead`` (tiny Llama compiled, 16 requests x 64 greedy
tokens, two ``add_vector`` concepts at layers 1 and 2), runs interleaved mode by mode; prints each
mode's median CPU and wall time per run and the median of per-rep paired ratios stock / mode (1.0 =
no overhead). This is not the end-to-end throughput of the separate-process benchmark (no
engine-core process, no IPC); it is the place to see costs of ~1 % that its wall-clock noise hides.

``--front-end`` also times the plugin's ``InputProcessor.process_inputs`` patch per request
against vLLM's own (thread CPU time, 2000 requests, best of 3), untoggled and toggled.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def front_end(llm, prompt: str) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.input_processor import InputProcessor

    patched = InputProcessor.process_inputs
    original = next(c.cell_contents for c in patched.__closure__ or ()
                    if getattr(c.cell_contents, "__name__", "") == "process_inputs")
    processor = llm.llm_engine.input_processor
    ids = llm.get_tokenizer()(prompt)["input_ids"]

    def per_request(fn, toggles, n=2000) -> float:
        start = time.thread_time_ns()
        for i in range(n):
            params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True,
                                    extra_args={"erase": toggles} if toggles else None)
            fn(processor, f"fe{i}", TokensPrompt(prompt_token_ids=ids), params, ("generate",))
        return (time.thread_time_ns() - start) / n / 1e3

    for toggles in (None, "alpha,beta"):
        plain = min(per_request(original, toggles) for _ in range(3))
        ours = min(per_request(patched, toggles) for _ in range(3))
        print(f"front end, toggles={toggles}: vLLM {plain:.1f} us/request, with erasekit {ours:.1f} "
              f"(+{ours - plain:.1f} us)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vllm_overhead.inproc", description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--modes", default="stock,none,half,all")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--front-end", action="store_true")
    parser.add_argument("--no-detokenize", action="store_true",
                        help="SamplingParams(detokenize=False): leave out the front end's incremental detokenizer, "
                             "whose cost depends on which tokens were generated (toggled requests generate others)")
    args = parser.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    from benchmarks.vllm_overhead.__main__ import _engine, _half, _prompts
    from benchmarks.vllm_overhead.__main__ import _run as run_detokenized
    from erasekit.integrations.vllm_plugin import register
    from erasekit.integrations.vllm_testing import write_world

    register()
    world = write_world(Path(tempfile.mkdtemp(prefix="erasekit-inproc-")),
                        concepts={"alpha": {"layers": [1, 2]}, "beta": {"layers": [1, 2]}}, norm=2.0)
    def _run(llm, prompts, toggles, max_tokens):
        if not args.no_detokenize:
            return run_detokenized(llm, prompts, toggles, max_tokens)
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                                 extra_args={"erase": t} if t else None) for t in toggles]
        llm.generate(prompts, params, use_tqdm=False)

    names = [m for m in args.modes.split(",") if m]
    stock = _engine(world.model_dir, None, False, 16) if "stock" in names else None
    guarded = _engine(world.model_dir, world.policy_path, False, 16)
    prompts = _prompts(16)
    toggles = {"stock": [None] * 16, "none": [None] * 16, "half": _half(16), "all": ["alpha,beta"] * 16}
    modes = {m: (stock if m == "stock" else guarded, toggles[m]) for m in names}
    for llm, t in modes.values():
        _run(llm, prompts, t, args.tokens)
    rows: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for m in order:
            llm, t = modes[m]
            cpu, wall = time.thread_time(), time.perf_counter()
            _run(llm, prompts, t, args.tokens)
            rows[m].append((time.thread_time() - cpu, time.perf_counter() - wall))
    print(f"in-process A/B, {args.reps} reps of 16 requests x {args.tokens} tokens"
          f"{' (not detokenized)' if args.no_detokenize else ''}, load average at end "
          f"{os.getloadavg()[0]:.1f}")
    for m, runs in rows.items():
        line = (f"{m:<6} cpu {statistics.median(r[0] for r in runs) * 1e3:7.2f} ms/run  "
                f"wall {statistics.median(r[1] for r in runs) * 1e3:7.2f} ms/run")
        if "stock" in rows:
            ratio = statistics.median(s[0] / r[0] for s, r in zip(rows["stock"], runs, strict=True))
            line += f"  paired cpu ratio stock/{m} {ratio:.4f}"
        print(line)
    if args.front_end:
        front_end(guarded, prompts[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
