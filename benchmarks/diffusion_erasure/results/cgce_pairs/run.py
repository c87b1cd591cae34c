# ruff: noqa
"""CGCE detectors calibrated from template pairs vs from the world's training captions (issue #6; DEV concepts only).

Usage (after ``../cgce_detection/cache.py`` has written its cache):
``PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/diffusion_erasure/results/cgce_pairs/run.py`` -> ``pairs.json``, ``pairs.md``.
Each arm fits erasekit's own detector (``fit_detector`` with the pack defaults) and is scored at P > 0.5 on the
detection study's cached evaluation sets, plus 300 unseen training-vocabulary captions with / without the concept.
"""
import json, os, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from erasekit.classifiers.cgce import DEFAULTS
from erasekit.classifiers.detector import fit_detector
from erasekit.guardrails.concept import Concept
from erasekit.integrations.diffusers_calibrate import encode_conditioning, concept_embedding
from erasekit.testing.diffusion_world import load_world
from erasekit.testing.diffusion_world.scenes import CONCEPTS, _TRAIN_STYLE

EVAL = {"circle", "star", "red", "blue", "stripes", "dots"}
DEV = ["square", "triangle", "cross", "heart", "green", "yellow", "purple", "orange", "checker", "plain"]
HERE = Path(__file__).parent
CACHE = Path(os.environ.get("CACHE", "bench_out/cgce-detection/cache"))
ld = lambda c, k: np.load(CACHE / f"{c}_{k}.npy", allow_pickle=False)
w = load_world(); w.pipe.set_progress_bar_config(disable=True)
enc = lambda ps: encode_conditioning(w.pipe, ps, 64).numpy().astype(np.float32)


def noun_phrases(concept: str) -> list[str]:
    """The concept's training synonyms as phrases that fill a noun slot ("a {concept}")."""
    fam = w.family(concept)
    if fam == "shape":
        return w.train_synonyms(concept)
    if fam == "colour":
        return [f"{s} shape" for s in w.train_synonyms(concept)]
    return [f"{t} shape" if prefix else f"shape {t}" for t, prefix in _TRAIN_STYLE[concept]]


def arms(c: str) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    fam = w.family(c)
    contrasts = [p for s in CONCEPTS[fam] if s != c for p in noun_phrases(s)]
    out = {"world captions (benchmark)": (ld(c, "tr")[:300], ld(c, "re")[:300], 300)}
    for name, n in (("template pairs, all", None), ("template pairs, n=300", 300)):
        concept = Concept.from_templates(c, w.train_templates(), noun_phrases(c), contrasts, n=n, seed=1)
        out[name] = (enc(list(concept.forget)), enc(list(concept.retain)), len(concept.forget))
    u, s, n = out["template pairs, all"]  # both, as `erasekit calibrate --forget/--retain ... --templates ...` gives
    out["world captions + template pairs, all"] = (np.concatenate([ld(c, "tr")[:300], u]),
                                                   np.concatenate([ld(c, "re")[:300], s]), 300 + n)
    return out


res = {}
t0 = time.time()
for c in DEV:
    assert c not in EVAL
    kw = concept_embedding(w.pipe, [c]).numpy()
    held_in_pos, held_in_neg = ld(c, "tr")[600:900], ld(c, "re")[600:900]  # unseen by every arm
    res[c] = {}
    for name, (u, s, n) in arms(c).items():
        det = fit_detector(u, s, kw, tau=float(DEFAULTS["tau"]), flat=bool(DEFAULTS["flat"]))
        p = lambda E: det.predict_proba(E.reshape(len(E), -1))[:, 1]
        res[c][name] = dict(pairs=n, C=float(det.steps[-1][1].C),
                            paraphrase=float((p(ld(c, "para")) > .5).mean()), multi=float((p(ld(c, "multi")) > .5).mean()),
                            captions=float((p(held_in_pos) > .5).mean()), caption_fp=int((p(held_in_neg) > .5).sum()),
                            benign_fp=int((p(ld(c, "ben")) > .5).sum()), retain_fp=int((p(ld(c, "ret2")) > .5).sum()))
    print(c, {k: (v["paraphrase"], v["captions"]) for k, v in res[c].items()}, f"{time.time() - t0:.0f}s", flush=True)

names = list(res[DEV[0]])
json.dump({"concepts": DEV, "results": res, "seconds": round(time.time() - t0, 1)}, open(HERE / "pairs.json", "w"), indent=1)
lines = ["| calibration | pairs per concept | paraphrase recall (48 each) | unseen caption recall (300) | multi-concept recall, lowest | caption FP (of 3000) | benign FP (of 960) | fresh-retain FP (of 3000) |",
         "|---|---|---|---|---|---|---|---|"]
for a in names:
    r = [res[c][a] for c in DEV]
    lines.append(f"| {a} | {min(x['pairs'] for x in r)}–{max(x['pairs'] for x in r)} | {np.mean([x['paraphrase'] for x in r]):.3f} | "
                 f"{np.mean([x['captions'] for x in r]):.3f} | {min(x['multi'] for x in r):.2f} | {sum(x['caption_fp'] for x in r)} | "
                 f"{sum(x['benign_fp'] for x in r)} | {sum(x['retain_fp'] for x in r)} |")
lines += ["", "Paraphrase recall per concept:", "", "| calibration | " + " | ".join(DEV) + " |", "|---|" + "---|" * len(DEV)]
lines += [f"| {a} | " + " | ".join(f"{res[c][a]['paraphrase']:.2f}" for c in DEV) + " |" for a in names]
(HERE / "pairs.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
