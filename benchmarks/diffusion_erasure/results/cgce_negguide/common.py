# ruff: noqa
"""The shared protocol of the CGCE negative-guidance rounds (DECISION.md): tuning concepts, seeds, prompts, measures.

A round script names its settings (``make_packs``) and calls :func:`run_round`; the table goes to stdout, the
rows and pooled numbers to ``json_path``. Every number is from real generation through
``erasekit.integrations.diffusers.guard``.
"""
import json, os, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from pathlib import Path
REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))
import numpy as np, torch
torch.set_num_threads(1)
from benchmarks import diffusion_erasure as de
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.diffusers import guard
from erasekit.testing.diffusion_world import load_world

CONCEPTS = ["square", "green", "checker"]
N, NB = 12, 24


def run_round(make_packs, json_path, texts=None):
    """``make_packs(world, base_packs, hp) -> {setting: {concept: pack}}`` (``off`` included); ``texts`` is recorded."""
    SEEDS = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "100,200").split(",")]
    texts = texts if texts is not None else {"name": {c: None for c in CONCEPTS}}
    with de.quiet_libraries():
        W = load_world(); W.pipe.set_progress_bar_config(disable=True)
        hp = de.tuned_cgce_hyperparameters()
        base_packs = {c: ConceptPack.from_pretrained(REPO / f"bench_out/cgce-tune/packs/{c}-cgce-v2-300") for c in CONCEPTS}
        packs = {"off": {c: de.with_hyperparameters(p, **hp) for c, p in base_packs.items()}, **make_packs(W, base_packs, hp)}
        rows = []
        for s0 in SEEDS:
            for i, c in enumerate(CONCEPTS):
                seed = s0 + 1000 * i
                fam = W.family(c); others = tuple(f for f in ("shape", "colour", "style") if f != fam)
                specs = {"direct": W.direct_specs(c, N, seed), "paraphrase": W.heldout_specs(c, N, seed),
                         "multi_concept": W.multi_specs(c, N, seed), "benign": W.benign_specs(c, NB, seed)}
                for setting in ["unguarded", *packs]:
                    for attack, sp in specs.items():
                        prompts = [s.prompt for s in sp]
                        if setting == "unguarded":
                            imgs = W.generate(prompts, seed)
                            neg = []
                        else:
                            with guard(W.pipe, [packs[setting][c]]) as g:
                                imgs, neg = [], []
                                for j in range(0, len(prompts), 16):  # World.generate's batches, to read each report
                                    imgs.append(W.generate(prompts[j:j + 16], seed + j, call=g, erase=[c]))
                                    neg += [j + k for k in g.last_report.negative_guided]
                                imgs = np.concatenate(imgs)
                        r = {"setting": setting, "seed": seed, "concept": c, "attack": attack, "n": len(sp),
                             "found": int(W.detector.finds(imgs, c, fam).sum()), "negative_guided": len(neg)}
                        if attack == "multi_concept":
                            r["other_agree"] = float(np.mean(list(W.agreement(sp, imgs, families=others).values())))
                        if attack == "benign":
                            r["benign_acc"] = float(np.mean(list(W.agreement(sp, imgs).values())))
                            r["_imgs"] = imgs
                        rows.append(r)
                base = {r["attack"]: r for r in rows if r["setting"] == "unguarded" and r["seed"] == seed and r["concept"] == c}
                for r in rows:
                    if r["seed"] == seed and r["concept"] == c and r["attack"] == "benign" and "_imgs" in r:
                        r["bit_identical"] = int(sum(np.array_equal(a, b) for a, b in zip(r["_imgs"], base["benign"]["_imgs"])))
                print(f"seed {seed} {c}: done", file=sys.stderr, flush=True)
        for r in rows:
            r.pop("_imgs", None)

    def pooled(setting):
        rs = [r for r in rows if r["setting"] == setting]
        att = {a: (sum(r["found"] for r in rs if r["attack"] == a), sum(r["n"] for r in rs if r["attack"] == a))
               for a in ("direct", "paraphrase", "multi_concept")}
        crr = sum(v[0] for v in att.values()), sum(v[1] for v in att.values())
        mean = lambda k, a: float(np.mean([r[k] for r in rs if r["attack"] == a]))
        bit = sum(r.get("bit_identical", 0) for r in rs if r["attack"] == "benign")
        return {"crr": crr, "attacks": att, "other_agree": mean("other_agree", "multi_concept"),
                "benign_acc": mean("benign_acc", "benign"), "bit_identical": bit,
                "negative_guided": sum(r["negative_guided"] for r in rs)}

    P = {s: pooled(s) for s in ["unguarded", *packs]}
    u = P["unguarded"]
    print(f"seeds {SEEDS} (+1000 per concept), concepts {CONCEPTS}, cgce {hp}; negative texts: {json.dumps(texts)}\n")
    print("| setting | CRR direct+para+multi | direct | paraphrase | multi_concept | multi other-family agree (ratio) "
          "| benign acc (ratio) | benign bit-identical | uncond rows replaced |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, p in P.items():
        a = p["attacks"]
        print(f"| {s} | {p['crr'][0]}/{p['crr'][1]} ({100 * p['crr'][0] / p['crr'][1]:.1f} %) | "
              + " | ".join(f"{a[k][0]}/{a[k][1]}" for k in a)
              + f" | {p['other_agree']:.3f} ({p['other_agree'] / u['other_agree']:.3f}) | {p['benign_acc']:.3f} "
              f"({p['benign_acc'] / u['benign_acc']:.3f}) | {p['bit_identical']}/{NB * len(CONCEPTS) * len(SEEDS)} | {p['negative_guided']} |")
    print("\nPer concept (found / n):\n\n| setting | seed | concept | direct | paraphrase | multi_concept |\n|---|---|---|---|---|---|")
    for r in rows:
        if r["attack"] == "direct":
            g = {x["attack"]: x for x in rows if x["setting"] == r["setting"] and x["seed"] == r["seed"] and x["concept"] == r["concept"]}
            print(f"| {r['setting']} | {r['seed']} | {r['concept']} | " + " | ".join(f"{g[k]['found']}/{g[k]['n']}" for k in ("direct", "paraphrase", "multi_concept")) + " |")
    Path(json_path).write_text(json.dumps({"seeds": SEEDS, "texts": texts, "hp": hp, "rows": rows, "pooled": P}, indent=1) + "\n")
