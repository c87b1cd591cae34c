"""LLM unlearning benchmark: MLLMEraser and KIF on real SmolLM2-135M and a tiny fictitious-facts LM.

    python -m benchmarks.llm_unlearning            # or: erasekit bench llm
    python -m benchmarks.llm_unlearning --models world --quick

Per model, concept, method and strength it reports forget accuracy (calibration phrasing),
held-out forget accuracy (phrasings never used for calibration), retain accuracy, the share of
benign prompts (concept toggled on) whose greedy output is token-identical to the unguarded
model, a latent-trace probe (logistic regression for "is about the subject" on mean-pooled
decoder-layer outputs, trained unguarded, scored unguarded vs guarded), calibration time and
the guarded/unguarded generation-time ratio on benign and flagged prompts, measured in this
process. Writes ``benchmarks/results/llm_unlearning.json`` and ``llm_unlearning.png`` and prints
a table. Everything is greedy and seeded: a rerun gives the same accuracies.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from erasekit import Concept, ConceptPack  # noqa: E402
from erasekit.integrations.transformers import TransformersGuard, find_decoder_layers  # noqa: E402
from erasekit.integrations.transformers_calibrate import calibrate, format_prompts  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results"
FEW_SHOT = ("Question: What is the capital of Canada?\nAnswer: Ottawa\n\n"
            "Question: Who invented the telephone?\nAnswer: Alexander Graham Bell\n\n"
            "Question: {prompt}\nAnswer:")


@dataclass
class Task:
    """One model + concept: prompts (raw text for routers, formatted for the model) and answers."""

    model_name: str
    concept: Concept
    template: str | None
    forget: list[tuple[str, tuple[str, ...]]]
    heldout: list[tuple[str, tuple[str, ...]]]
    retain: list[tuple[str, tuple[str, ...]]]
    benign: list[str]
    hp: dict[str, dict[str, Any]] = field(default_factory=dict)
    strengths: dict[str, list[float]] = field(default_factory=dict)
    max_new_tokens: int = 6
    time_overhead: bool = True
    router: Any = True


class Runner:
    def __init__(self, model: torch.nn.Module, tok: Any, template: str | None, batch_size: int = 32):
        self.model, self.tok, self.template, self.batch_size = model, tok, template, batch_size
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token

    def fmt(self, prompts: list[str]) -> list[str]:
        return format_prompts(self.tok, prompts, "template" if self.template else "raw", template=self.template)

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.tok(self.fmt(prompts), return_tensors="pt", padding=True)

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int, guard: TransformersGuard | None = None,
                 erase: Any = None) -> list[list[int]]:
        out: list[list[int]] = []
        for s in range(0, len(prompts), self.batch_size):
            chunk = prompts[s:s + self.batch_size]
            enc = self.encode(chunk)
            kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": self.tok.pad_token_id}
            if guard is None:
                ids = self.model.generate(**enc, **kw)
            else:
                ids = guard.generate(**enc, erase=erase, prompts=chunk, **kw)
            out += [row.tolist() for row in ids[:, enc["input_ids"].shape[1]:]]
        return out

    def accuracy(self, items: list[tuple[str, tuple[str, ...]]], outputs: list[list[int]]) -> float:
        hits = 0
        for (_, answers), ids in zip(items, outputs, strict=True):
            text = self.tok.decode(ids, skip_special_tokens=True).strip().split("\n")[0].lower()
            hits += any(a.lower() in text for a in answers)
        return hits / max(len(items), 1)

    @torch.inference_mode()
    def pooled(self, prompts: list[str], layers: list[int], guard: TransformersGuard | None = None,
               erase: Any = None) -> dict[int, torch.Tensor]:
        """Mean-pooled outputs of decoder ``layers`` (after any guard edit), one forward per batch."""
        blocks = find_decoder_layers(self.model)
        got: dict[int, torch.Tensor] = {}
        handles = [blocks[i].register_forward_hook(
            lambda m, a, o, i=i: got.__setitem__(i, o[0] if isinstance(o, tuple) else o)) for i in layers]
        rows: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        try:
            for s in range(0, len(prompts), self.batch_size):
                chunk = prompts[s:s + self.batch_size]
                enc = self.encode(chunk)
                if guard is None:
                    self.model(**enc, use_cache=False)
                else:
                    guard(**enc, erase=erase, prompts=chunk, use_cache=False)
                m = enc["attention_mask"].unsqueeze(-1).float()
                for i in layers:
                    rows[i].append((got[i].float() * m).sum(1) / m.sum(1))
        finally:
            for h in handles:
                h.remove()
        return {i: torch.cat(r) for i, r in rows.items()}


def _timeit(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def overhead(runner: Runner, guard: TransformersGuard, concept: str, benign: list[str], flagged: list[str],
             max_new_tokens: int, repeats: int) -> dict[str, float]:
    """Guarded / unguarded generation time, interleaved in this process.

    The ratio uses the fastest of ``repeats`` runs of each (the minimum is the estimate least
    disturbed by other processes on a shared machine); the median ratio is reported too.
    """
    res = {}
    for label, prompts, erase in (("benign_untoggled", benign, None), ("benign_toggled", benign, [concept]),
                                  ("flagged", flagged, [concept])):
        runner.generate(prompts, max_new_tokens)  # warm-up
        runner.generate(prompts, max_new_tokens, guard, erase)
        base, guarded = [], []
        for _ in range(repeats):
            base.append(_timeit(lambda p=prompts: runner.generate(p, max_new_tokens), 1))
            guarded.append(_timeit(lambda p=prompts, e=erase: runner.generate(p, max_new_tokens, guard, e), 1))
        res[f"{label}_ratio"] = round(min(guarded) / min(base), 4)
        res[f"{label}_median_ratio"] = round(statistics.median(guarded) / statistics.median(base), 4)
        res[f"{label}_unguarded_s"] = round(min(base), 4)
    res["repeats"] = repeats
    res["idle_hook_cost"] = hook_cost(runner, guard, benign, max_new_tokens, res["benign_untoggled_unguarded_s"])
    return res


def hook_cost(runner: Runner, guard: TransformersGuard, prompts: list[str], max_new_tokens: int,
              unguarded_s: float, calls: int = 20000) -> dict[str, float]:
    """What the attached-but-idle guard adds per ``generate``, measured piece by piece.

    End-to-end ratios on a shared 2-core machine are noisy at the ±5-10 % level, so this times
    what the guard adds on a benign call directly: PyTorch's hook dispatch per hooked module
    (timed on ``nn.Identity`` with vs without a no-op hook), the model pre-hook, and the layer
    hook's early exit, times the number of calls one ``generate`` makes (one per forward step).
    """
    from erasekit.integrations.transformers import _CallState

    enc = runner.encode(prompts)
    ident = torch.nn.Identity()
    x = torch.zeros(1)
    plain = _timeit(lambda: [ident(x) for _ in range(calls)], 3) / calls
    h = ident.register_forward_hook(lambda m, a, o: None)
    hooked = _timeit(lambda: [ident(x) for _ in range(calls)], 3) / calls
    h.remove()
    saved = guard._state
    guard._state = _CallState({}, {}, False)  # a call in which no row is active
    try:
        kw = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "past_key_values": None}
        pre = _timeit(lambda: [guard._pre_forward(runner.model, (), kw) for _ in range(calls)], 3) / calls
        layer_hooks = [guard._make_layer_hook(i) for i in sorted(guard._by_layer)]
        out = torch.zeros(1, 1, 1)
        post = _timeit(lambda: [layer_hooks[0](None, (), out) for _ in range(calls)], 3) / calls
    finally:
        guard._state = saved
    n_hooked = len(layer_hooks)
    per_step = (n_hooked + 1) * max(hooked - plain, 0.0) + pre + n_hooked * post
    total = per_step * max_new_tokens  # one forward per generated token (prefill + decode steps)
    return {"hooked_modules": n_hooked + 1, "dispatch_us": round(max(hooked - plain, 0.0) * 1e6, 3),
            "pre_hook_us": round(pre * 1e6, 3), "layer_hook_us": round(post * 1e6, 3),
            "per_generate_ms": round(total * 1e3, 4), "fraction_of_generate": round(total / unguarded_s, 6)}


def probe_scores(runner: Runner, task: Task, guard: TransformersGuard | None, layers: list[int]) -> dict[str, Any]:
    """Linear probe for the subject: fit unguarded on calibration prompts, score held-out prompts."""
    from sklearn.linear_model import LogisticRegression

    train_pos = [q for q, _ in task.forget]
    train_neg = [q for q, _ in task.retain[: max(len(train_pos) * 2, 20)]]
    test_pos = [q for q, _ in task.heldout]
    test_neg = task.benign[: max(len(test_pos) * 2, 20)]
    pos_train = runner.pooled(train_pos, layers)
    neg_train = runner.pooled(train_neg, layers)
    pos_before = runner.pooled(test_pos, layers)
    neg_test = runner.pooled(test_neg, layers)
    pos_after = runner.pooled(test_pos, layers, guard, [task.concept.name]) if guard is not None else None
    out = {}
    for layer in layers:
        x = torch.cat([pos_train[layer], neg_train[layer]]).numpy()
        y = [1] * len(train_pos) + [0] * len(train_neg)
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(x, y)
        entry = {"subject_detected_unguarded": float(clf.predict(pos_before[layer].numpy()).mean()),
                 "false_positive_unguarded": float(clf.predict(neg_test[layer].numpy()).mean())}
        if pos_after is not None:
            entry["subject_detected_guarded"] = float(clf.predict(pos_after[layer].numpy()).mean())
        out[str(layer)] = entry
    return out


def evaluate_method(runner: Runner, task: Task, method: str, base: dict[str, Any], args: argparse.Namespace,
                    log) -> dict[str, Any]:
    label = method
    method, _, variant = method.partition("+")  # "mllmeraser+router": the method plus erasekit's router
    hp = dict(task.hp.get(method, {}))
    if variant == "router":
        hp["router"] = task.router
    hp.setdefault("router", False)
    if task.template:
        hp["prompt_template"] = task.template
    start = time.perf_counter()
    pack = calibrate(runner.model, task.concept, method, tokenizer=runner.tok, hyperparameters=hp, progress=False)
    calib_s = time.perf_counter() - start
    knob = "strength" if method == "mllmeraser" else args.kif_knob
    sweep = []
    n_layers = len(find_decoder_layers(runner.model))
    for value in task.strengths[method]:
        p = ConceptPack(pack.concept, pack.method, pack.fingerprint, pack.tensors,
                        {**pack.hyperparameters, knob: value})
        with TransformersGuard(runner.model, [p], tokenizer=runner.tok) as g:
            erase = [task.concept.name]
            forget = runner.accuracy(task.forget, runner.generate([q for q, _ in task.forget], task.max_new_tokens, g, erase))
            held = runner.accuracy(task.heldout, runner.generate([q for q, _ in task.heldout], task.max_new_tokens, g, erase))
            retain_out = runner.generate([q for q, _ in task.retain], task.max_new_tokens, g, erase)
            retain = runner.accuracy(task.retain, retain_out)
            # benign prompts = the retain prompts, sent WITH the concept toggled on
            identical = sum(a == b for a, b in zip(retain_out, base["retain_out"], strict=True)) / len(task.retain)
        row = {knob: value, "forget_acc": forget, "heldout_forget_acc": held, "retain_acc": retain,
               "benign_identical_rate": identical}
        row["meets_acceptance"] = bool(
            forget <= 0.10 * base["forget_acc"] + 1e-9 and retain >= 0.95 * base["retain_acc"] - 1e-9
            and identical >= 0.99)
        sweep.append(row)
        log(f"  {task.model_name:8s} {task.concept.name:14s} {label:17s} {knob}={value:<6} forget {forget:.2f} "
            f"held-out {held:.2f} retain {retain:.2f} benign-identical {identical:.2f}")
    ok = [r for r in sweep if r["meets_acceptance"]]
    best = min(ok, key=lambda r: r["forget_acc"]) if ok else min(
        sweep, key=lambda r: (r["forget_acc"] / max(base["forget_acc"], 1e-9)) - r["retain_acc"] / max(base["retain_acc"], 1e-9))
    chosen = ConceptPack(pack.concept, pack.method, pack.fingerprint, pack.tensors,
                         {**pack.hyperparameters, knob: best[knob]})
    result: dict[str, Any] = {"method": label, "calibration_s": round(calib_s, 2), "knob": knob, "sweep": sweep,
                              "chosen": best, "hyperparameters": chosen.hyperparameters,
                              "calibration_prompts": len(task.concept.forget) + len(task.concept.retain),
                              "edited_layers": pack.tensors["layers"].tolist()}
    with TransformersGuard(runner.model, [chosen], tokenizer=runner.tok) as g:
        if not args.skip_probe:
            result["probe"] = probe_scores(runner, task, g, sorted({n_layers // 2, n_layers - 1}))
        if not args.skip_overhead and task.time_overhead:
            flagged = [q for q, _ in task.forget][: args.timing_batch]
            result["overhead"] = overhead(runner, g, task.concept.name, task.benign[: args.timing_batch], flagged,
                                          task.max_new_tokens, args.repeats)
    return result


def run_task(runner: Runner, task: Task, args: argparse.Namespace, log) -> dict[str, Any]:
    forget_out = runner.generate([q for q, _ in task.forget], task.max_new_tokens)
    held_out = runner.generate([q for q, _ in task.heldout], task.max_new_tokens)
    retain_out = runner.generate([q for q, _ in task.retain], task.max_new_tokens)
    base = {"forget_acc": runner.accuracy(task.forget, forget_out),
            "heldout_forget_acc": runner.accuracy(task.heldout, held_out),
            "retain_acc": runner.accuracy(task.retain, retain_out), "retain_out": retain_out}
    log(f"  {task.model_name:8s} {task.concept.name:14s} base       forget {base['forget_acc']:.2f} "
        f"held-out {base['heldout_forget_acc']:.2f} retain {base['retain_acc']:.2f}")
    methods = [evaluate_method(runner, task, m, base, args, log) for m in args.methods]
    base.pop("retain_out")
    return {"model": task.model_name, "concept": task.concept.name, "base": base,
            "n_forget": len(task.forget), "n_heldout": len(task.heldout), "n_retain": len(task.retain),
            "n_benign": len(task.retain), "calibration_forget": len(task.concept.forget),
            "calibration_retain": len(task.concept.retain), "methods": methods}


# ---------------------------------------------------------------------------- the two models
def smollm2_tasks(args: argparse.Namespace) -> tuple[Runner, list[Task]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.llm_unlearning.data import CONCEPTS, GENERAL, read_cloze
    from erasekit.testing.assets import smollm2_dir

    d = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    runner = Runner(model, tok, FEW_SHOT, args.batch_size)
    book = [p.split("[MASK]")[0].strip()[-300:] for _, p in read_cloze("book_cloze", limit=40, seed=0)]
    book = [b for b in book if len(b) > 40][:20]  # passages whose [MASK] comes late enough to give context
    tasks = []
    for name, spec in CONCEPTS.items():
        qa = spec["qa"][: args.limit]
        others = [x for other, s in CONCEPTS.items() if other != name for x in s["qa"]][: args.limit]
        general = GENERAL[: args.limit]
        retain = [(x.calib, x.answers) for x in general + others] + [(x.heldout, x.answers) for x in general]
        concept = Concept(name, forget=[x.calib for x in qa],
                          retain=[x.calib for x in general + others] + book,
                          keywords=spec["keywords"], target="I don't know.")
        tasks.append(Task(
            "smollm2", concept, FEW_SHOT,
            forget=[(x.calib, x.answers) for x in qa], heldout=[(x.heldout, x.answers) for x in qa],
            retain=retain, benign=[x.heldout for x in general] + [x.calib for x in general],
            hp={"mllmeraser": {}, "kif": {"router": True, "num_layers": args.kif_layers, "refusal_strength": 1.0,
                                               "refusal_units": "residual_norm"}},
            strengths={"mllmeraser": args.mll_strengths, "kif": args.kif_strengths}, max_new_tokens=6,
            time_overhead=not tasks))
    return runner, tasks


def world_tasks(args: argparse.Namespace) -> tuple[Runner, list[Task]]:
    import random

    from benchmarks.llm_unlearning import world

    model, tok, people, info = world.load_world()
    runner = Runner(model, tok, None, 128)
    forget_people = [p for p in people if p.forget]
    others = [p for p in people if not p.forget]
    rng = random.Random(0)
    calib_retain = [world.prompt(p, rng.choice(world.CALIBRATION_TEMPLATES)) for p in rng.sample(others, 60)]
    concept = Concept("zorvath_family",
                      forget=[world.prompt(p, t) for p in forget_people for t in world.CALIBRATION_TEMPLATES],
                      retain=calib_retain, keywords=[world.FORGET_SURNAME], target="an unknown place.")
    task = Task(
        "world", concept, None,
        forget=[(world.prompt(p, t), (p.city,)) for p in forget_people for t in world.CALIBRATION_TEMPLATES],
        heldout=[(world.prompt(p, t), (p.city,)) for p in forget_people for t in world.HELDOUT_TEMPLATES],
        retain=[(world.prompt(p, t), (p.city,)) for p in others for t in range(len(world.TEMPLATES))],
        benign=[world.prompt(p, t) for p in others for t in world.HELDOUT_TEMPLATES],
        hp={"mllmeraser": {}, "kif": {"router": "keywords", "num_layers": args.world_kif_layers, "refusal_strength": 1.0,
                                               "refusal_units": "residual_norm"}},
        router="keywords",
        strengths={"mllmeraser": args.world_mll_strengths, "kif": args.world_kif_strengths},
        max_new_tokens=12)  # byte-level tokens: the longest city name is 10 bytes + space
    return runner, [task]


# ---------------------------------------------------------------------------- report
def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'model':8s} {'concept':15s} {'method':17s} {'setting':>20s} {'forget':>7s} {'held-out':>8s} "
            f"{'retain':>7s} {'benign=':>7s} {'calib s':>7s} {'ovh benign':>10s} {'ovh flagged':>11s} ok")
    lines = [head, "-" * len(head)]
    for r in results:
        b = r["base"]
        lines.append(f"{r['model']:8s} {r['concept']:15s} {'(none)':17s} {'':>20s} {b['forget_acc']:7.2f} "
                     f"{b['heldout_forget_acc']:8.2f} {b['retain_acc']:7.2f} {'1.00':>7s}")
        for m in r["methods"]:
            c = m["chosen"]
            o = m.get("overhead", {})
            lines.append(
                f"{'':8s} {'':15s} {m['method']:17s} {m['knob'] + '=' + str(c[m['knob']]):>20s} {c['forget_acc']:7.2f} "
                f"{c['heldout_forget_acc']:8.2f} {c['retain_acc']:7.2f} {c['benign_identical_rate']:7.2f} "
                f"{m['calibration_s']:7.1f} {o.get('benign_toggled_ratio', float('nan')):10.3f} "
                f"{o.get('flagged_ratio', float('nan')):11.3f} {'yes' if c['meets_acceptance'] else 'no'}")
    return "\n".join(lines)


def markdown(results: list[dict[str, Any]]) -> str:
    """The chosen setting per method (best forget accuracy meeting the acceptance, else best trade-off)."""
    lines = ["| model | concept | method | setting | forget | held-out forget | retain | benign identical | "
             "probe: subject still detected (mid / last layer) | calibration s | overhead benign untoggled / toggled / flagged | meets acceptance |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = r["base"]
        lines.append(f"| {r['model']} | {r['concept']} | unguarded | | {b['forget_acc']:.2f} | {b['heldout_forget_acc']:.2f} | "
                     f"{b['retain_acc']:.2f} | 1.00 | | | | |")
        for m in r["methods"]:
            c = m["chosen"]
            probe = m.get("probe", {})
            pr = " / ".join(f"{v['subject_detected_unguarded']:.2f}→{v.get('subject_detected_guarded', float('nan')):.2f}"
                            for _, v in sorted(probe.items(), key=lambda kv: int(kv[0])))
            o = m.get("overhead")
            ovh = (f"{o['benign_untoggled_ratio']:.3f} / {o['benign_toggled_ratio']:.3f} / {o['flagged_ratio']:.3f}"
                   if o else "")
            lines.append(f"| | | {m['method']} | {m['knob']}={c[m['knob']]:g} | {c['forget_acc']:.2f} | "
                         f"{c['heldout_forget_acc']:.2f} | {c['retain_acc']:.2f} | {c['benign_identical_rate']:.2f} | "
                         f"{pr} | {m['calibration_s']:.1f} | {ovh} | {'yes' if c['meets_acceptance'] else 'no'} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        b = r["base"]
        ax.scatter([b["retain_acc"]], [b["forget_acc"]], marker="*", s=160, c="k", label="unguarded", zorder=3)
        for m, color in zip(r["methods"], ("tab:blue", "tab:green", "tab:orange", "tab:red"), strict=False):
            xs = [s["retain_acc"] for s in m["sweep"]]
            ys = [s["forget_acc"] for s in m["sweep"]]
            ax.plot(xs, ys, "o-", color=color, label=m["method"])
            for s in m["sweep"]:
                ax.annotate(f"{s[m['knob']]:g}", (s["retain_acc"], s["forget_acc"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.axhline(0.1 * b["forget_acc"], ls=":", c="gray", lw=1)
        ax.axvline(0.95 * b["retain_acc"], ls=":", c="gray", lw=1)
        ax.set_title(f"{r['model']}: {r['concept']}", fontsize=10)
        ax.set_xlabel("retain accuracy (higher is better)")
        ax.set_ylabel("forget accuracy (lower is better)")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, max(0.3, b["forget_acc"] * 1.15))
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("erasekit LLM erasure: forget vs retain per method and strength (dotted: acceptance bounds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def remeasure_overhead(args: argparse.Namespace, out: Path, log) -> int:
    """Re-time guarded/unguarded generation for the chosen settings already in ``out``."""
    report = json.loads(out.read_text())
    for model_name in [m for m in args.models.split(",") if m]:
        builder = {"smollm2": smollm2_tasks, "world": world_tasks}[model_name]
        runner, tasks = builder(args)
        task = tasks[0]
        entry = next(r for r in report["results"] if r["model"] == model_name and r["concept"] == task.concept.name)
        for m in entry["methods"]:
            method, _, variant = m["method"].partition("+")
            hp = dict(task.hp.get(method, {}))
            hp["router"] = task.router if variant == "router" else hp.get("router", False)
            if task.template:
                hp["prompt_template"] = task.template
            hp[m["knob"]] = m["chosen"][m["knob"]]
            pack = calibrate(runner.model, task.concept, method, tokenizer=runner.tok, hyperparameters=hp,
                             progress=False)
            with TransformersGuard(runner.model, [pack], tokenizer=runner.tok) as g:
                m["overhead"] = overhead(runner, g, task.concept.name, task.benign[: args.timing_batch],
                                         [q for q, _ in task.forget][: args.timing_batch], task.max_new_tokens,
                                         args.repeats)
            log(f"  {model_name} {task.concept.name} {m['method']}: {m['overhead']}")
    report.setdefault("commands", [report["command"]]).append(
        "python -m benchmarks.llm_unlearning " + " ".join(sys.argv[1:]))
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report["results"]) + "\n")
    print(table(report["results"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.llm_unlearning", description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="world,smollm2", help="comma-separated: world, smollm2")
    ap.add_argument("--methods", default="mllmeraser,mllmeraser+router,kif",
                    help="mllmeraser, kif, and X+router (the method gated by erasekit's prompt router)")
    ap.add_argument("--mll-strengths", default="-0.2,-0.5,-1.0", help="MLLMEraser λ values (SmolLM2)")
    ap.add_argument("--world-mll-strengths", default="-0.2,-0.5,-1.0", help="MLLMEraser λ values (world LM)")
    ap.add_argument("--kif-knob", default="refusal_strength", choices=["refusal_strength", "suppression"],
                    help="KIF hyperparameter swept (the other keeps its calibrated value)")
    ap.add_argument("--kif-strengths", default="0.5,1,2",
                    help="KIF values of --kif-knob (refusal strength in units of the layer's mean residual norm)")
    ap.add_argument("--kif-layers", type=int, default=1, help="KIF: number of best layers edited (SmolLM2)")
    ap.add_argument("--world-kif-strengths", default="1,2,4", help="KIF values of --kif-knob (world LM)")
    ap.add_argument("--world-kif-layers", type=int, default=2, help="KIF: number of best layers edited (world LM)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the results of models not run now from an existing --out file")
    ap.add_argument("--limit", type=int, default=None, help="at most this many questions per set (smoke runs)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--timing-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--overhead-only", action="store_true",
                    help="re-measure only the overhead of the chosen settings in an existing --out file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on 2 shared cores)")
    ap.add_argument("--skip-probe", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--quick", action="store_true", help="one strength per method, 10 questions, no timing")
    ap.add_argument("--out", default=str(RESULTS / "llm_unlearning.json"))
    args = ap.parse_args(argv)
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    args.mll_strengths, args.world_mll_strengths = floats(args.mll_strengths), floats(args.world_mll_strengths)
    args.kif_strengths, args.world_kif_strengths = floats(args.kif_strengths), floats(args.world_kif_strengths)
    args.methods = [m for m in args.methods.split(",") if m]
    if args.quick:
        args.limit = args.limit or 10
        args.mll_strengths, args.world_mll_strengths = args.mll_strengths[-1:], args.world_mll_strengths[-1:]
        args.kif_strengths, args.world_kif_strengths = args.kif_strengths[-1:], args.world_kif_strengths[-1:]
        args.skip_overhead = True
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    log = lambda s: print(s, flush=True)  # noqa: E731
    started = time.perf_counter()
    if args.overhead_only:
        return remeasure_overhead(args, out, log)
    for model_name in [m for m in args.models.split(",") if m]:
        builder = {"smollm2": smollm2_tasks, "world": world_tasks}[model_name]
        runner, tasks = builder(args)
        for task in tasks:
            results.append(run_task(runner, task, args, log))
        del runner
    command = "python -m benchmarks.llm_unlearning " + " ".join(argv if argv is not None else sys.argv[1:])
    commands = [command]
    if args.merge and out.is_file():
        previous = json.loads(out.read_text())
        merged = []
        for old in previous["results"]:
            new = next((r for r in results if (r["model"], r["concept"]) == (old["model"], old["concept"])), None)
            if new is not None:  # keep the methods not re-run now
                labels = {m["method"] for m in new["methods"]}
                old = {**new, "methods": [m for m in old["methods"] if m["method"] not in labels] + new["methods"]}
            merged.append(old)
        seen = {(r["model"], r["concept"]) for r in merged}
        results = merged + [r for r in results if (r["model"], r["concept"]) not in seen]
        commands = [c for c in previous.get("commands", [previous.get("command")]) if c] + commands
    report = {
        "benchmark": "llm_unlearning",
        "command": command,
        "commands": commands,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                    "torch": torch.__version__},
        "total_seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    out.write_text(json.dumps(report, indent=1))
    png = out.with_suffix(".png")
    plot(results, png)
    out.with_suffix(".md").write_text(markdown(results) + "\n")
    print()
    print(table(results))
    print(f"\nwrote {out} and {png} in {report['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
