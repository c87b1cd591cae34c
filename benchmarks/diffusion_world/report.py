"""Table and image grid for the diffusion-world benchmark (people look at these, not at JSON)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["markdown_table", "save_grid"]


def _pct(x: float) -> str:
    return f"{100 * x:.0f}"


def markdown_table(result: dict) -> str:
    """CRR per concept and attack as 'unguarded → guarded' (%), then the utility columns."""
    from benchmarks.diffusion_world import ATTACKS

    head = ["concept", *ATTACKS, "benign acc", "pixel drift", "bit-identical"]
    lines = [
        f"CRR % (unguarded → guarded `{result['guard']}`), lower is better; "
        f"{result['settings']['n_images']} images per cell, seed {result['seed']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]

    def cells(crr: dict, util: dict) -> list[str]:
        out = [f"{_pct(crr[a]['unguarded'])} → {_pct(crr[a]['guarded'])}" for a in ATTACKS]
        out += [f"{_pct(util['benign_accuracy_unguarded'])} → {_pct(util['benign_accuracy_guarded'])}",
                f"{util['pixel_drift_mean_abs']:.4f}", _pct(util["bit_identical_rate"])]
        return out

    for concept, row in result["per_concept"].items():
        lines.append("| " + " | ".join([concept, *cells(row["crr"], row["utility"])]) + " |")
    lines.append("| " + " | ".join(["**mean**", *cells(result["summary_crr"], result["summary_utility"])]) + " |")
    det = result["detector_accuracy_heldout_real"]
    lines += ["", "Detector accuracy on held-out real scenes: "
              + ", ".join(f"{f} {_pct(v)} %" for f, v in det.items())]
    return "\n".join(lines)


def save_grid(grid: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], path: Path, guard_name: str) -> None:
    """Rows: concepts; columns: (unguarded, guarded) pairs per attack; first image of each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concepts = list(grid)
    attacks = list(next(iter(grid.values()))) if concepts else []
    ncols = 2 * len(attacks)
    fig, axes = plt.subplots(len(concepts), ncols, figsize=(0.9 * ncols + 1, 1.0 * len(concepts) + 0.8), squeeze=False)
    for r, concept in enumerate(concepts):
        for a, attack in enumerate(attacks):
            for k, img in enumerate(grid[concept][attack]):
                ax = axes[r][2 * a + k]
                ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{attack}\n{'unguarded' if k == 0 else guard_name}", fontsize=6)
                if a == 0 and k == 0:
                    ax.set_ylabel(concept, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
