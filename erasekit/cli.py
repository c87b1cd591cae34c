"""``erasekit`` command line: inspect packs, calibrate concepts, run the demo and benchmarks.

Subcommands whose capability is not built yet say so and exit non-zero rather than pretend.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from erasekit import __version__
from erasekit.errors import ErasekitError

#: ``erasekit bench NAME`` runs ``python -m benchmarks.<module>`` from the source checkout.
BENCHMARKS = {
    "llm": "llm_unlearning",
    "vllm": "vllm_overhead",
    "diffusion-world": "diffusion_world",
    "diffusion": "diffusion_erasure",
    "soak": "soak",
}
#: ``erasekit calibrate --method M`` is implemented by ``<module>.calibrate_main(args)``.
CALIBRATORS = {
    "mllmeraser": "erasekit.integrations.transformers_calibrate",
    "kif": "erasekit.integrations.transformers_calibrate",
    "cgce": "erasekit.integrations.diffusers_calibrate",
    "irece": "erasekit.integrations.diffusers_calibrate",
}
#: Methods whose calibration calls a diffusers pipeline, so ``--call KEY=VALUE`` applies to them.
DIFFUSION_METHODS = tuple(m for m, module in CALIBRATORS.items() if module.endswith(".diffusers_calibrate"))


def _cmd_info(args: argparse.Namespace) -> int:
    from erasekit.guardrails.pack import ConceptPack

    pack = ConceptPack.from_pretrained(args.pack)
    print(json.dumps(pack.manifest_summary(), indent=2, sort_keys=True))
    print(f"\nOK: {args.pack} is a valid {pack.method} pack for concept {pack.name!r}.", file=sys.stderr)
    call = pack.hyperparameters.get("call_kwargs")
    if isinstance(call, dict) and call:  # recorded by `erasekit calibrate --call`: serve with the same settings
        settings = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(call.items()))
        print(f"Calibrated with pipeline call settings: {settings}", file=sys.stderr)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    module_name = CALIBRATORS[args.method]
    anchor_option = next((o for o, v in (("--anchor-prompts", getattr(args, "anchor_prompts", None)),
                                         ("--anchor-retain", getattr(args, "anchor_retain", None))) if v), None)
    if anchor_option and args.method != "cgce":
        raise ErasekitError(anchor_option, None, f"--method {args.method} has no anchor (only CGCE refinement "
                            "steers onto one)", "drop the anchor options, or use --method cgce")
    if getattr(args, "subphrases", None) and args.method != "cgce":
        raise ErasekitError("--subphrases", None, f"--method {args.method} does not fit a prompt detector",
                            "drop --subphrases, or use --method cgce")
    if args.call and args.method not in DIFFUSION_METHODS:
        raise ErasekitError("--call", args.call[0].partition("=")[0], f"--method {args.method} calibrates a "
                            "language model, not a diffusers pipeline call", "drop --call, or use --method cgce|irece")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(f"erasekit calibrate --method {args.method}: not built yet ({module_name} is missing).", file=sys.stderr)
        return 2
    return int(module.calibrate_main(args) or 0)


def _repo_root() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (base / "benchmarks" / "__init__.py").is_file():
            return base
    return None


def _cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    module = BENCHMARKS[args.name]
    root = _repo_root()
    if root is None:
        print("erasekit bench: the benchmarks ship with the source checkout; run this from the repo.", file=sys.stderr)
        return 2
    if not (root / "benchmarks" / module).exists() and not (root / "benchmarks" / f"{module}.py").exists():
        print(f"erasekit bench {args.name}: not built yet (benchmarks/{module} is missing).", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    return subprocess.call([sys.executable, "-m", f"benchmarks.{module}", *extra], cwd=root, env=env)


def _cmd_demo(args: argparse.Namespace) -> int:
    from erasekit.demo import run_demo

    return run_demo(out_dir=Path(args.out), sections=args.only)


def _add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--templates/--phrases/--contrasts/--pairs`` options shared by ``calibrate`` and ``pairs``."""
    parser.add_argument("--templates", default=None, metavar="FILE",
                        help="text file, one template per line with one {concept} slot, e.g. 'a photo of {concept}': "
                             "forget/retain prompts are made as minimal pairs from it, --phrases and --contrasts "
                             "(calibrate adds them after the --forget/--retain prompts when those are given too)")
    parser.add_argument("--phrases", default=None, metavar="FILE",
                        help="with --templates: text file, one phrasing of the concept per line, e.g. 'a five-pointed star'")
    parser.add_argument("--contrasts", default=None, metavar="FILE",
                        help="with --templates: text file, one phrasing per line of what fills the slot in the retain "
                             "prompt instead, e.g. 'a circle'")
    parser.add_argument("--pairs", type=int, default=None, metavar="N",
                        help="with --templates: draw N distinct (template, phrase, contrast) pairs (default: every "
                             "template with every phrase once)")
    parser.add_argument("--pairs-seed", type=int, default=0, metavar="SEED", help="seed for drawing/dealing the pairs")


def _cmd_pairs(args: argparse.Namespace) -> int:
    from erasekit.guardrails.cli_inputs import generated_pairs

    if not args.templates:
        raise ErasekitError("erasekit pairs", "--templates", "nothing to generate",
                            "pass --templates, --phrases and --contrasts (text files, one item per line)")
    forget, retain, _ = generated_pairs(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "forget.txt").write_text("\n".join(forget) + "\n", encoding="utf-8")
    (out / "retain.txt").write_text("\n".join(retain) + "\n", encoding="utf-8")
    for f, r in list(zip(forget, retain, strict=True))[:3]:
        print(f"  {f!r}  |  {r!r}")
    print(f"wrote {len(forget)} pairs to {out / 'forget.txt'} and {out / 'retain.txt'} "
          f"(edit them, then: erasekit calibrate --forget ... --retain ...)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erasekit",
        description="Inference-time concept erasure for Diffusers, transformers and vLLM.",
        epilog="Docs and the two set-up commands: README.md.",
    )
    parser.add_argument("--version", action="version", version=f"erasekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="print a pack's manifest and validate it")
    info.add_argument("pack", help="path to a pack directory")
    info.set_defaults(func=_cmd_info)

    cal = sub.add_parser("calibrate", help="calibrate a concept pack for a model")
    cal.add_argument("--model", required=True, help="model directory (HF format) or diffusers pipeline directory")
    cal.add_argument("--concept", required=True, help="concept name, e.g. harry_potter")
    cal.add_argument("--forget", default=None, metavar="FILE",
                     help="text file, one prompt per line, that elicits the concept (or generate pairs: --templates)")
    cal.add_argument("--retain", default=None, metavar="FILE", help="text file, one prompt per line, that must keep working")
    _add_pair_arguments(cal)
    cal.add_argument("--subphrases", default=None, metavar="FILE",
                     help="cgce: text file, one phrasing of the concept per line (e.g. its synonyms); forget prompts "
                          "using a multi-word one are added again cut to one distinctive word ('valentine heart' -> "
                          "'valentine'), so the detector learns the parts paraphrases reuse")
    cal.add_argument("--method", required=True, choices=sorted(CALIBRATORS))
    cal.add_argument("--keywords", default="", help="comma-separated keywords for the router (kif)")
    cal.add_argument("--target", default=None,
                     help="refusal text (LLM methods), or the phrase naming a CGCE anchor, e.g. 'plain' (with --anchor-prompts)")
    cal.add_argument("--anchor-prompts", default=None, metavar="FILE",
                     help="cgce: text file, one prompt per line, showing the neutral value flagged prompts are steered "
                          "onto instead of only away from the concept (needs --target naming it)")
    cal.add_argument("--anchor-retain", default=None, metavar="FILE",
                     help="cgce with --anchor-prompts: prompts WITHOUT the anchor (default: --retain minus the anchor "
                          "prompts); pass it when --retain names the anchor in other words")
    cal.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a method hyperparameter (JSON value), repeatable; e.g. for cgce "
                          "--set anchor_text='with a plain fill' (words flagged prompts are re-encoded with), or "
                          "--set 'detect_phrases=[\"star\", \"five-pointed star\"]' (a separate detection head "
                          "attending to the concept's synonyms)")
    cal.add_argument("--call", action="append", default=[], metavar="KEY=VALUE",
                     help="diffusion (cgce/irece): a pipeline-call argument (JSON scalar) to calibrate under, "
                          "as the pipeline will be served, e.g. --call num_frames=49; repeatable")
    cal.add_argument("-o", "--output", required=True, help="pack directory to write")
    cal.set_defaults(func=_cmd_calibrate)

    pairs = sub.add_parser("pairs", help="write forget/retain prompt files made from templates (to read or edit "
                                         "before calibrate)")
    _add_pair_arguments(pairs)
    pairs.add_argument("-o", "--output", required=True, help="folder for forget.txt and retain.txt")
    pairs.set_defaults(func=_cmd_pairs)

    demo = sub.add_parser("demo", help="run the end-to-end demo and write a markdown report")
    demo.add_argument("--out", default="demo_out", help="folder for the report and images")
    demo.add_argument("--only", action="append", default=None, help="run only this section (repeatable)")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="run a benchmark (extra arguments go to the benchmark)")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command == "bench":
            return _cmd_bench(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except ErasekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
