"""``python -m benchmarks.gpu_check --out DIR [--device cuda|cpu] [--quick] [--sections ABCD] [--irece] [--clip-tokenizer DIR]``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu_check.common import Section, log


def _environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    for mod in ("transformers", "diffusers", "numpy", "sklearn", "onnxruntime", "skl2onnx", "onnx"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - record what is missing
            env[mod] = f"unavailable ({type(exc).__name__}: {exc})"
    try:  # looked up, never imported
        env["vllm_installed"] = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        env["vllm_installed"] = False
    return env


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict) and "median_paired_ratio" in v:
        parts = [f"{k} {r}" for k, r in v["median_paired_ratio"].items()]
        meds = ", ".join(f"{k} {s * 1e3:.2f} ms" for k, s in v["median_s"].items())
        return f"median paired ratio: {'; '.join(parts)} (reps {v['reps']}; medians {meds})"
    if isinstance(v, list) and v and isinstance(v[0], dict):
        return "<br>".join(", ".join(f"{k}={_esc(x)}" for k, x in row.items()) for row in v)
    return _esc(v)


def _esc(text: Any) -> str:
    return str(text).replace("|", "\\|")


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    env = result["environment"]
    lines = [
        "# erasekit GPU check",
        "",
        f"`{result['command']}` — {env.get('gpu', env['device'])}, torch {env['torch']}, "
        f"transformers {env.get('transformers')}, diffusers {env.get('diffusers')}, "
        f"{result['seconds']:.0f} s, {env['time_utc']}",
        "",
        "| section | status | s |",
        "|---|---|---|",
    ]
    for key, sec in result["sections"].items():
        lines.append(f"| {key}: {_esc(sec['title'])} | {sec['status']} | {sec['seconds']} |")
    for key, sec in result["sections"].items():
        lines += ["", f"## {key}: {sec['title']} — {sec['status']}", ""]
        if sec["checks"]:
            lines += ["| check | result | expected | measured |", "|---|---|---|---|"]
            for c in sec["checks"]:
                measured = ", ".join(
                    f"{_esc(k)}={_fmt(v)}" for k, v in c.items() if k not in ("name", "ok", "expected")
                )
                lines.append(
                    f"| {_esc(c['name'])} | {'PASS' if c['ok'] else 'FAIL'} | {_esc(c['expected'])} | {measured} |"
                )
        if sec["numbers"]:
            lines += ["", "| number | value |", "|---|---|"]
            lines += [f"| {_esc(k)} | {_fmt(v)} |" for k, v in sec["numbers"].items()]
        for n in sec["notes"]:
            lines.append(f"\n- note: {n}")
        for e in sec["errors"]:
            err = e["error"].replace("`", "'")
            lines.append(f"\n- ERROR in {e['where']}: `{err}` (traceback in gpu_check.json)")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    parser.add_argument("--out", required=True, help="output folder (gpu_check.json, gpu_check.md)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU dry run)")
    parser.add_argument("--sections", default="ABCD", help="subset of A, B, C, D")
    parser.add_argument(
        "--cgce-packs", default=None, help="folder of <concept>-cgce* packs (else calibrated here)"
    )
    parser.add_argument("--irece", action="store_true", help="also calibrate and check IRECE (heavy)")
    parser.add_argument(
        "--random-text-encoder",
        action="store_true",
        help="section C: use the world with a random MiniLM-shaped text encoder even if MiniLM is installed",
    )
    parser.add_argument(
        "--llm-shapes",
        default=None,
        help="comma list of tiny,smollm2_shape (default: tiny with --quick, else both)",
    )
    parser.add_argument(
        "--clip-tokenizer",
        default=None,
        help="section D: folder with the SD-1.x CLIP tokenizer's vocab.json/merges.txt (a copy of "
        "~/.cache/erasekit/clip-tokenizer-sd1; default: .whl/clip-tokenizer-sd1 if present, else that cache)",
    )
    parser.add_argument("--d-reps", type=int, default=5, help="section D: timing reps per batch size")
    parser.add_argument("--d-budget", type=float, default=90.0, help="section D: seconds it may take (reps shrink to fit)")
    parser.add_argument("--d-batches", default="1,4", help="section D: batch sizes to time")
    parser.add_argument("--d-warmup-s", type=float, default=10.0,
                        help="section D on CUDA: seconds of UNet forwards before timing (raises the GPU's idle clock)")
    parser.add_argument("--d-anchor-text-dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="section D: precision of the anchored guard's re-encoding (default: the pipeline's own)")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python -m benchmarks.gpu_check " + " ".join(argv or sys.argv[1:]),
        "environment": _environment(args.device),
        "sections": {},
    }
    log(f"environment: {result['environment']}")

    def save() -> None:
        result["seconds"] = round(time.perf_counter() - start, 1)
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
        write_markdown(out / "gpu_check.md", result)

    shapes = (args.llm_shapes or ("tiny" if args.quick else "tiny,smollm2_shape")).split(",")
    plan = []
    if "A" in args.sections:
        from benchmarks.gpu_check import llm

        plan.append(("A", "transformers guard", lambda s: llm.run(s, device, args.quick, shapes)))
    if "B" in args.sections:
        from benchmarks.gpu_check import vllm_op

        plan.append(("B", "vLLM edit op, torch only", lambda s: vllm_op.run(s, device, args.quick)))
    if "C" in args.sections:
        from benchmarks.gpu_check import diffusion

        plan.append(
            (
                "C",
                "diffusers guard",
                lambda s: diffusion.run_section(
                    s, device, args.quick, args.cgce_packs, args.irece, args.random_text_encoder
                ),
            )
        )
    if "D" in args.sections:
        from benchmarks.gpu_check import sd15

        plan.append(
            (
                "D",
                "diffusers guard, SD1.5-sized random pipeline (fp16 on CUDA)",
                lambda s: sd15.run(s, device, args.quick, args.clip_tokenizer, budget_s=args.d_budget, reps=args.d_reps,
                                  batches=tuple(int(b) for b in args.d_batches.split(",")), warmup_s=args.d_warmup_s,
                                  anchor_text_dtype=args.d_anchor_text_dtype),
            )
        )
    for key, title, fn in plan:
        sec = Section(key, title).run(fn)
        result["sections"][key] = sec.as_dict()
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()
    statuses = {k: s["status"] for k, s in result["sections"].items()}
    log(
        f"done in {result['seconds']} s: {statuses}; wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}"
    )
    return 0 if all(s == "pass" for s in statuses.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
