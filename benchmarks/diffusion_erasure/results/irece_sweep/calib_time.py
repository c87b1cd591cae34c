# ruff: noqa
"""Round 5: IRECE calibration time and gate statistics through the benchmark's own path
(benchmarks.diffusion_erasure.irece_concept + calibrate_irece, --calibration-prompts 300), TUNING concept only.

``python calib_time.py square 48:300:0.01 96:800:0.01`` -- each argument n_prompts:n_holdout:gate_fpr.
"""
from common import *
c = sys.argv[1]
hp0 = {k: v for k, v in de.tuned_irece_hyperparameters().items() if k not in ("n_holdout", "n_prompts", "gate_fpr")}
concept = Concept(c, forget=W.train_prompts(c, 300, seed=1), retain=W.retain_prompts(c, 300, seed=1), keywords=[c])
for spec in sys.argv[2:]:
    n, nh, fpr = spec.split(":"); hp = {**hp0, "n_prompts": int(n), "n_holdout": int(nh), "gate_fpr": float(fpr)}
    t0 = time.time()
    ir = calibrate_irece(W.pipe, de.irece_concept(W, concept, hp), call_kwargs=de.world_call_kwargs(W), **hp)
    dt = time.time() - t0
    print(c, spec, f"calibration {dt:.0f}s", {k: ir.hyperparameters[k] for k in
          ("gate_holdout_negatives", "gate_train_tpr", "gate_train_fpr", "probe_train_accuracy")}, flush=True)
