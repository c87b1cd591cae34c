# ruff: noqa
"""Sub-phrase augmentation of CGCE's forget prompts vs the benchmark's detector, DEV concepts only (issue #6).

Usage: ``PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/diffusion_erasure/results/cgce_subphrases/decide.py [CAL/EVAL ...]``
(default: the three confirmatory seed sets of README.md). Encodings are cached in
``bench_out/cgce-subphrases/``. Writes ``decision[_SUFFIX].json`` and ``DECISION[_SUFFIX].md`` beside this file
(SUFFIX from ``SUF``), applying the README's rules. Both arms use erasekit's own code: ``fit_detector`` with the
pack defaults, and ``with_subphrases`` (the calibration option) for the second arm.
"""
import json, os, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from erasekit.classifiers.cgce import DEFAULTS
from erasekit.classifiers.detector import fit_detector
from erasekit.guardrails.concept import Concept
from erasekit.integrations.diffusers_calibrate import concept_embedding, encode_conditioning, with_subphrases
from erasekit.testing.diffusion_world import load_world

EVAL = {"circle", "star", "red", "blue", "stripes", "dots"}
DEV = ["square", "triangle", "cross", "heart", "green", "yellow", "purple", "orange", "checker", "plain"]
SETS = [tuple(int(x) for x in a.split("/")) for a in sys.argv[1:]] or [(10, 41), (11, 43), (12, 47)]
HERE, SUF = Path(__file__).parent, os.environ.get("SUF", "")
w = load_world(); w.pipe.set_progress_bar_config(disable=True)


def encoded(folder: Path, key: str, prompts: list[str]) -> np.ndarray:
    path = folder / f"{key}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    e = encode_conditioning(w.pipe, prompts, 64).numpy().astype(np.float32)
    np.save(path, e, allow_pickle=False)
    return e


def run_set(cal: int, ev: int) -> dict:
    folder = Path(f"bench_out/cgce-subphrases/cache_{cal}_{ev}"); folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for c in DEV:
        assert c not in EVAL
        tr_all = w.train_prompts(c, 900, seed=cal)
        prompts = dict(tr=tr_all[:300], re=w.retain_prompts(c, 300, seed=cal), cap=tr_all[600:900],
                       capneg=w.retain_prompts(c, 900, seed=cal)[600:900], para=w.heldout_prompts(c, 48, seed=ev),
                       ben=[s.prompt for s in w.benign_specs(c, 96, seed=ev)], ret2=w.retain_prompts(c, 300, seed=ev + 2),
                       multi=[s.prompt for s in w.multi_specs(c, 48, seed=ev)])
        E = {k: encoded(folder, f"{c}_{k}", v) for k, v in prompts.items()}
        aug = with_subphrases(w.pipe, Concept(c, forget=prompts["tr"], retain=prompts["re"], keywords=[c]),
                              w.train_synonyms(c))
        extra = list(aug.forget[300:])
        kw = concept_embedding(w.pipe, [c]).numpy()
        arms = {"base": E["tr"], "subphrases": np.concatenate([E["tr"], encoded(folder, f"{c}_extra", extra)]) if extra else E["tr"]}
        out[c] = {"words": aug.metadata["subphrases"], "extra_prompts": len(extra)}
        for arm, U in arms.items():
            det = fit_detector(U, E["re"], kw, tau=float(DEFAULTS["tau"]), flat=bool(DEFAULTS["flat"]))
            flag = lambda k: det.predict_proba(E[k].reshape(len(E[k]), -1))[:, 1] > 0.5
            out[c][arm] = dict(para=float(flag("para").mean()), ben_fp=int(flag("ben").sum()), ret2_fp=int(flag("ret2").sum()),
                               multi=float(flag("multi").mean()), cap=float(flag("cap").mean()), cap_fp=int(flag("capneg").sum()))
    return out


def summary(res: dict, arm: str) -> dict:
    r = [res[c][arm] for c in DEV]
    return dict(para=float(np.mean([x["para"] for x in r])), ben_fp=sum(x["ben_fp"] for x in r),
                ret2_fp=sum(x["ret2_fp"] for x in r), multi_min=min(x["multi"] for x in r),
                cap=float(np.mean([x["cap"] for x in r])), cap_fp=sum(x["cap_fp"] for x in r))


t0 = time.time()
results = {f"{cal}/{ev}": run_set(cal, ev) for cal, ev in SETS}
S = {k: {a: summary(r, a) for a in ("base", "subphrases")} for k, r in results.items()}
pool = {a: float(np.mean([S[k][a]["para"] for k in S])) for a in ("base", "subphrases")}
rules = {
    "1 pooled paraphrase recall >= base + 0.05, and >= base on every set":
        pool["subphrases"] >= pool["base"] + 0.05 and all(S[k]["subphrases"]["para"] >= S[k]["base"]["para"] for k in S),
    "2 benign FP <= 4 of 960 on every set, and summed <= base's sum + 2":
        all(S[k]["subphrases"]["ben_fp"] <= 4 for k in S)
        and sum(S[k]["subphrases"]["ben_fp"] for k in S) <= sum(S[k]["base"]["ben_fp"] for k in S) + 2,
    "3 fresh-retain FP summed <= base's sum + 9 (0.1 % of 9000)":
        sum(S[k]["subphrases"]["ret2_fp"] for k in S) <= sum(S[k]["base"]["ret2_fp"] for k in S) + 9,
    "4 lowest multi-concept recall on every set >= base's - 0.03":
        all(S[k]["subphrases"]["multi_min"] >= S[k]["base"]["multi_min"] - 0.03 for k in S),
    "5 pooled unseen-caption recall >= base's - 0.01":
        np.mean([S[k]["subphrases"]["cap"] for k in S]) >= np.mean([S[k]["base"]["cap"] for k in S]) - 0.01,
}
rules = {k: bool(v) for k, v in rules.items()}
adopt = all(rules.values())
json.dump({"sets": list(results), "per_set": S, "pooled_paraphrase": pool, "rules": rules, "adopt": adopt,
           "per_concept": results, "seconds": round(time.time() - t0, 1)}, open(HERE / f"decision{SUF}.json", "w"), indent=1)
lines = [f"# Decision{SUF}: {'ADOPT' if adopt else 'NOT ADOPTED'} (sets {', '.join(results)}; {time.time() - t0:.0f} s)", "",
         "| set | arm | paraphrase recall | benign FP (of 960) | fresh-retain FP (of 3000) | multi-concept lowest | unseen-caption recall | caption FP (of 3000) |",
         "|---|---|---|---|---|---|---|---|"]
for k in S:
    for a in ("base", "subphrases"):
        x = S[k][a]
        lines.append(f"| {k} | {a} | {x['para']:.3f} | {x['ben_fp']} | {x['ret2_fp']} | {x['multi_min']:.3f} | {x['cap']:.3f} | {x['cap_fp']} |")
lines += ["", f"Pooled paraphrase recall: base {pool['base']:.3f}, subphrases {pool['subphrases']:.3f}.", ""]
lines += [f"- rule {k}: **{'holds' if v else 'fails'}**" for k, v in rules.items()]
lines += ["", "Per concept paraphrase recall (base -> subphrases) and the words used:", ""]
for k, r in results.items():
    lines.append(f"- {k}: " + "; ".join(f"{c} {r[c]['base']['para']:.2f}->{r[c]['subphrases']['para']:.2f}" for c in DEV))
lines.append(f"- words: " + "; ".join(f"{c}: {sorted({x for v in results[next(iter(results))][c]['words'].values() for x in v})}" for c in DEV))
(HERE / f"DECISION{SUF}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
