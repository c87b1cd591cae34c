# ruff: noqa
"""Which development-concept paraphrases the world draws as the concept, and which the benchmark's detector flags.

Usage (after ``../cgce_detection/cache.py`` and ``../cgce_detection/variants.py base``):
``PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/diffusion_erasure/results/cgce_subphrases/rendered_misses.py heart,triangle``
Images: the detection study's 48 paraphrases per concept (evaluation seed 7), seed 1000 + i, the world's judge.
"""
import collections, json, sys
import numpy as np, torch
torch.set_num_threads(2)
from erasekit.testing.diffusion_world import load_world
from erasekit.testing.diffusion_world.scenes import _HELDOUT_SHAPE, _HELDOUT_COLOUR, _HELDOUT_STYLE

EVAL = {"circle", "star", "red", "blue", "stripes", "dots"}
w = load_world(); w.pipe.set_progress_bar_config(disable=True)
base = json.load(open("bench_out/cgce-detection/res_base.json"))
for c in sys.argv[1].split(","):
    assert c not in EVAL
    prompts = json.load(open(f"bench_out/cgce-detection/cache/{c}_prompts.json"))["para"]
    shown = [label == c for label in w.detector(w.generate(prompts, seed=1000))[w.family(c)]]
    flagged = np.array(base[c]["scores"]["para"]) > 0.5
    held = {**_HELDOUT_SHAPE, **_HELDOUT_COLOUR, **{k: [t for t, _ in v] for k, v in _HELDOUT_STYLE.items()}}[c]
    rows = collections.defaultdict(lambda: [0, 0, 0, 0])
    for p, s, f in zip(prompts, shown, flagged):
        r = rows[next((h for h in sorted(held, key=len, reverse=True) if h in p), "?")]
        r[0] += 1; r[1] += s; r[2] += f; r[3] += s and not f
    print(f"{c}: drawn {sum(shown)}/48, flagged {int(flagged.sum())}/48, drawn but not flagged {sum(r[3] for r in rows.values())}")
    for h, (n, s, f, m) in rows.items():
        print(f"  {h!r}: {n} prompts, drawn {s}, flagged {f}, drawn but not flagged {m}")
