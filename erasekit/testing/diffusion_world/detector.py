"""The concept detector: a small CNN with one head per concept family (shape, colour, style).

Why a separate, independently trained classifier: erasure is judged by what is IN the generated
image, not by what the guard believes it did. The detector is trained on rendered scenes (plus
their reconstructions through the world's VAE, so the slight blur of generated images is not
out of distribution) and must reach >= 98 % on held-out rendered scenes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from erasekit.testing.diffusion_world.scenes import CONCEPTS, FAMILIES

__all__ = ["ConceptDetector", "to_tensor"]


def to_tensor(images: object) -> torch.Tensor:
    """Images as float32 (N, 3, H, W) in [0, 1]: accepts (N,H,W,3) arrays/tensors, PIL lists, or NCHW tensors."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float()
        if x.ndim == 3:
            x = x[None]
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        return x.contiguous()
    if isinstance(images, np.ndarray):
        arr = images
    else:  # a list of PIL images or arrays
        arr = np.stack([np.asarray(im) for im in images])
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    if arr.ndim == 3:
        arr = arr[None]
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(0, 3, 1, 2).contiguous()


class ConceptDetector(nn.Module):
    """CNN over 32x32 RGB with heads ``shape`` (6), ``colour`` (6), ``style`` (4).

    Calling it on images returns ``{family: [predicted concept name per image]}``; use
    :meth:`probs` for probabilities and :meth:`features` for the penultimate features that the
    benchmark's feature-drift metric compares.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        # Shapes need the global layout (a star and a cross share local edges), so the body
        # keeps a 4x4 spatial map and flattens it instead of global pooling.
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * w * 16, 128), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({f: nn.Linear(128, len(CONCEPTS[f])) for f in FAMILIES})

    def logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-family logits for NCHW images in [0, 1]."""
        h = self.body(x * 2.0 - 1.0)
        return {f: head(h) for f, head in self.heads.items()}

    def features(self, images: object) -> torch.Tensor:
        """Penultimate features (N, 128): the 'feature drift' space."""
        with torch.no_grad():
            return self.body(to_tensor(images) * 2.0 - 1.0)

    def probs(self, images: object) -> dict[str, torch.Tensor]:
        """Softmax probabilities per family, each (N, n_concepts)."""
        with torch.no_grad():
            return {f: v.softmax(-1) for f, v in self.logits(to_tensor(images)).items()}

    def forward(self, images: object) -> dict[str, list[str]]:  # type: ignore[override]
        return {f: [CONCEPTS[f][i] for i in p.argmax(-1).tolist()] for f, p in self.probs(images).items()}

    def finds(self, images: object, concept: str, family: str) -> torch.Tensor:
        """Bool (N,): the detector's top prediction in ``family`` is ``concept``."""
        p = self.probs(images)[family]
        return p.argmax(-1) == CONCEPTS[family].index(concept)

    def accuracy(self, images: object, labels: Sequence[dict[str, str]]) -> dict[str, float]:
        """Per-family accuracy against ground-truth label dicts."""
        pred = self(images)
        return {f: float(np.mean([p == lab[f] for p, lab in zip(pred[f], labels, strict=True)])) for f in FAMILIES}
