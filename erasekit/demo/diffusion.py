"""Demo section: CGCE and IRECE on the trained diffusion world, before/after images in one PNG grid.

Calibrates a CGCE and an IRECE pack for two world concepts on TRAINING prompts, then shows,
for each concept, the unguarded image, CGCE, and CGCE+IRECE for: a direct prompt, a held-out
paraphrase, a benign prompt (must be identical) and a DDIM-inverted real image (the latent
attack that only IRECE can see). The detector's verdict is printed under each image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DEMO_CONCEPTS = ("red", "circle")
CALIBRATION_PROMPTS = 300


def _grid(rows: list[tuple[str, list[tuple[str, np.ndarray, str]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(len(cells) for _, cells in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.9 * ncols, 2.1 * len(rows)), squeeze=False)
    for r, (label, cells) in enumerate(rows):
        for c, (title, img, verdict) in enumerate(cells):
            ax = axes[r][c]
            ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=7)
            ax.set_xlabel(verdict, fontsize=7)
        axes[r][0].set_ylabel(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(report) -> None:  # noqa: ANN001 - DemoReport
    import torch

    from benchmarks.diffusion_erasure import (
        calibrate_packs,
        quiet_libraries,
        tuned_cgce_hyperparameters,
        tuned_irece_hyperparameters,
    )
    from benchmarks.diffusion_world import NoGuard
    from benchmarks.diffusion_world.attacks import ddim_invert
    from erasekit.integrations.diffusers import guard
    from erasekit.testing.diffusion_world import load_world

    torch.set_num_threads(1)
    with quiet_libraries():
        world = load_world(os.environ.get("ERASEKIT_DIFFUSION_WORLD"))  # default: the committed world
        world.pipe.set_progress_bar_config(disable=True)
        irece_hp, cgce_hp = tuned_irece_hyperparameters(), tuned_cgce_hyperparameters()
        report.say(f"World: {type(world.pipe).__name__}, {world.num_inference_steps} DDIM steps, "
                   f"{world.height}x{world.width} images; tuned CGCE {cgce_hp or 'defaults'}, "
                   f"IRECE {irece_hp or 'defaults'} (benchmarks/diffusion_erasure/irece_tuned.json).")
        packs = calibrate_packs(world, list(DEMO_CONCEPTS), CALIBRATION_PROMPTS, irece_hp, cgce_hp=cgce_hp,
                                anchor_text=True, subphrases=True)  # as the benchmark (anchor: styles only)
        rows = []
        for concept in DEMO_CONCEPTS:
            cg, ir = packs[concept]["cgce"], packs[concept]["irece"]
            fam = world.family(concept)
            direct = world.direct_prompts(concept, 1, 11)[0]
            para = world.heldout_prompts(concept, 1, 11)[0]
            benign = world.benign_specs(concept, 1, 11)[0].prompt
            inverted = ddim_invert(world, world.real_images(concept, 1, 11), lambda: NoGuard(world.pipe).erasing([]))
            cases = [("direct", [direct], {}), ("paraphrase", [para], {}), ("benign", [benign], {}),
                     ("DDIM latent", [""], {"latents": inverted, "guidance_scale": 1.0})]
            for case, prompts, extra in cases:
                cells = []
                for name, plist in (("unguarded", None), ("CGCE", [cg]), ("CGCE+IRECE", [cg, ir])):
                    if plist is None:
                        img = world.generate(prompts, 5, **extra)
                        base = img
                    else:
                        with guard(world.pipe, plist) as g:
                            img = world.generate(prompts, 5, call=g, erase=[concept], **extra)
                    verdict = world.detector(img)[fam][0]
                    same = " (identical)" if plist is not None and np.array_equal(img, base) else ""
                    cells.append((name, img[0], f"{fam}: {verdict}{same}"))
                    report.say(f"- {concept} / {case} {prompts[0]!r}: {name} -> detector says {fam}={verdict}{same}")
                rows.append((f"{concept}\n{case}", cells))
        path = report.out_dir / "diffusion_before_after.png"
        _grid(rows, path)
        report.image(path, "CGCE / CGCE+IRECE on the diffusion world (rows: concept x case)")
        report.say("Numbers over many prompts and seeds: `erasekit bench diffusion` (docs/diffusion.md).")
