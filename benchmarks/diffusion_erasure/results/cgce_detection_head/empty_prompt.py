# ruff: noqa
"""P(concept) of the unconditional prompts "" and "blurry, low quality" on the world, for three
development concepts: the single detector, the detection head as calibrate_cgce fits it now (the empty
prompt among its negatives) and the head as the rounds measured it (without them).
Usage: ``PYTHONPATH=. python benchmarks/diffusion_erasure/results/cgce_detection_head/empty_prompt.py``"""
import numpy as np, torch
torch.set_num_threads(2)
from erasekit import Concept
from erasekit.classifiers.cgce import CGCEClassifier
from erasekit.classifiers.detector import fit_detector
from erasekit.integrations.diffusers_calibrate import calibrate_cgce, concept_embedding, encode_conditioning
from erasekit.testing.diffusion_world import load_world

w = load_world()
probe = encode_conditioning(w.pipe, ["", "blurry, low quality"])
print("| concept | single detector | head (empty prompt among negatives) | head as in the rounds |\n|---|---|---|---|")
for c in ("square", "checker", "green"):
    concept = Concept(c, forget=w.train_prompts(c, 300, seed=1), retain=w.retain_prompts(c, 300, seed=1), keywords=[c])
    base = CGCEClassifier.from_pack(calibrate_cgce(w.pipe, concept)).scores(probe)
    head = CGCEClassifier.from_pack(calibrate_cgce(w.pipe, concept, detect_phrases=w.train_synonyms(c))).scores(probe)
    unsafe, safe = encode_conditioning(w.pipe, concept.forget).numpy(), encode_conditioning(w.pipe, concept.retain).numpy()
    old = fit_detector(unsafe, safe, concept_embedding(w.pipe, w.train_synonyms(c)).numpy(), tau=0.05, flat=False)
    old = old.predict_proba(probe.numpy().reshape(len(probe), -1))[:, 1]
    f = lambda v: " / ".join(f"{x:.3f}" for x in v)
    print(f"| {c} | {f(base)} | {f(head)} | {f(old)} |", flush=True)
