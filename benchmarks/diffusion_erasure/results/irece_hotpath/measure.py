# ruff: noqa
"""IRECE's own work on a benign CGCE+IRECE call, timed inside the run (issue #6 latency).

``PYTHONPATH=SRC:. python benchmarks/diffusion_erasure/results/irece_hotpath/measure.py PACKS IRECE_PACK [CALLS]``

Wraps the guard's step callback (``DiffusersGuard._irece_step``) and the attention wrappers'
``_CaptureProcessor._score_and_cut`` with ``perf_counter_ns`` and reports their total per call
(median over the last ``CALLS - 2`` calls, 4 benign "circle"-toggled prompts of the benchmark's
overhead set, 20 steps, one thread). ``SRC`` selects the erasekit source: the working tree, or an
older checkout (``git worktree add /tmp/ek-before b935303``, then ``PYTHONPATH=/tmp/ek-before:.``)
for the "before" figure. PACKS is a benchmark run's ``packs`` folder (CGCE ``circle-cgce-v2-300``);
IRECE_PACK a saved circle IRECE pack (``cgce_latency.py --irece-cache DIR`` writes ``DIR/circle-irece``).
"""
import json, os, statistics, sys, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch
torch.set_num_threads(1)
import erasekit
from benchmarks import diffusion_erasure as de
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations import diffusers as dmod
from erasekit.testing.diffusion_world import load_world

packs, irece_pack = sys.argv[1], sys.argv[2]
calls = int(sys.argv[3]) if len(sys.argv) > 3 else 10
concept = "circle"
per_call = {"callback": [], "wrappers": []}
current = {"callback": 0, "wrappers": 0}


def timed(kind, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            current[kind] += time.perf_counter_ns() - t0
    return wrapper


dmod.DiffusersGuard._irece_step = timed("callback", dmod.DiffusersGuard._irece_step)
dmod._CaptureProcessor._score_and_cut = timed("wrappers", dmod._CaptureProcessor._score_and_cut)
with de.quiet_libraries():
    world = load_world(); world.pipe.set_progress_bar_config(disable=True)
    cg = de.with_hyperparameters(ConceptPack.from_pretrained(f"{packs}/{concept}-cgce-v2-300"), **de.tuned_cgce_hyperparameters())
    g = dmod.guard(world.pipe, [cg, ConceptPack.from_pretrained(irece_pack)])
    benign = [s.prompt for s in world.benign_specs(concept, 4, 3)]
    for _ in range(calls):
        current.update(callback=0, wrappers=0)
        world.generate(benign, 0, call=g, erase=[concept])
        for k in per_call:
            per_call[k].append(current[k] / 1e3)
    g.detach()
med = {k: round(statistics.median(v[2:]), 1) for k, v in per_call.items()}
print(json.dumps({"erasekit": os.path.dirname(erasekit.__file__), "calls": calls, "us_per_call_median": med,
                  "total_us": round(sum(med.values()), 1)}))
