# ruff: noqa
"""The probes' shared count: one guarded pack on CONCEPT's direct / paraphrase / multi_concept prompts at a
base seed and its reseeds -- survivals per attack, multi-concept other-family agreement, where images land."""
import collections
import numpy as np
from erasekit.integrations.diffusers import guard


def survivals(W, pack, concept, seed, n=12, reseeds=4):
    fam = W.family(concept); names = W.concepts[fam]; others = tuple(f for f in ("shape", "colour", "style") if f != fam)
    spec_fn = {"direct": W.direct_specs, "paraphrase": W.heldout_specs, "multi_concept": W.multi_specs}
    tot, agree, land_all = collections.Counter(), [], collections.Counter()
    for attack, fn in spec_fn.items():
        specs = fn(concept, n, seed); prompts = [s.prompt for s in specs]
        for k in range(reseeds + 1):
            with guard(W.pipe, [pack]) as g:
                imgs = W.generate(prompts, seed + 100_000 * k, call=g, erase=[concept])
            land = collections.Counter(names[i] for i in W.detector.probs(imgs)[fam].argmax(-1).tolist())
            tot[attack] += land[concept]; land_all.update(land)
            if attack == "multi_concept":
                agree.append(float(np.mean(list(W.agreement(specs, imgs, families=others).values()))))
    return tot, float(np.mean(agree)), land_all
