"""IRECE: find where a concept is forming by cross-attention, and perturb the latents there.

M-ErasureBench (arXiv 2512.22877) shows that an erased concept comes back through learned
embeddings and inverted latents, which never spell the concept in text, so text-side erasers
(CGCE included) cannot see it. IRECE looks at the image instead: pixels that are forming the
concept attend strongly to the concept's keys.

Localisation (our choice, justified): a *calibrated concept key* per cross-attention layer. The
obvious signal -- the share of attention image queries give to the concept word's text keys --
was measured on the trained world and does not separate images with the concept from images
without it (DDIM-inverted red vs green scenes: max share 0.221-0.229 vs 0.230-0.234; the UNet
reads MiniLM's contextual tokens, where every token carries the whole sentence, so its keys
barely localise words). So the key is learned instead: a logistic probe ``sigmoid(q . w + b)``
on each layer's cross-attention *queries*, fitted on the generator's own activations while it
draws forget prompts (concept) vs retain prompts (no concept). ``w`` is a direction in query
space, i.e. a key the concept's pixels attend to; it reads the image, so it localises the concept
whatever carried it in (text, a learned embedding, an inverted latent). Per-layer logits are
upsampled to latent size and averaged; their image mean gates the image (the probe is fitted on
image means, so that decision is calibrated), and the above-mean positions form the mask.

Perturbation (our choice): inside a window of denoising steps, masked latents are partially
re-noised, ``z <- sqrt(1 - s) z + sqrt(s) std(z) eps`` with ``eps`` from a seeded generator, so
the concept has to re-form from noise while the unmasked image is untouched (bit-identical).

All choices are pack hyperparameters (see ``DEFAULTS``) tuned on the world benchmark.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from erasekit.errors import PackError
from erasekit.guardrails.methods import MethodSpec, register_method

if TYPE_CHECKING:
    from erasekit.guardrails.pack import ConceptPack

METHOD = "irece"
#: ``layers``: "all" or a list of cross-attention processor names (resolved to names at
#: calibration); ``threshold``: image-level probe probability above which an image is masked;
#: ``strength``: re-noise fraction s; ``start``/``end``: step window as fractions of the schedule;
#: ``dilate``: mask dilation in latent pixels; ``seed``: noise seed.
DEFAULTS: dict[str, object] = {
    "layers": "all", "threshold": 0.5, "strength": 0.5, "start": 0.0, "end": 0.5, "dilate": 1, "seed": 0,
}


def probe_logits(query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Concept logit per image position, ``query . weight + bias``; [B, Q, C] -> [B, Q]."""
    return query.float() @ weight.float() + bias.float()


def maps_to_latent(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Average flat per-position maps ``[B, h*w]`` of several resolutions at latent ``size`` -> [B, H, W]."""
    height, width = size
    out = None
    for m in maps:
        ratio = math.sqrt(height * width / m.shape[1])
        h, w = round(height / ratio), round(width / ratio)
        if h * w != m.shape[1]:
            raise ValueError(f"attention map of {m.shape[1]} positions does not tile a {height}x{width} latent")
        up = F.interpolate(m.float().view(-1, 1, h, w), size=(height, width), mode="bilinear", align_corners=False)
        out = up if out is None else out + up
    if out is None:
        raise ValueError("no attention maps captured")
    return (out / len(maps))[:, 0]


def build_mask(logits: torch.Tensor, threshold: float, dilate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [B, 1, H, W] from per-position concept logits [B, H, W]; also returns the image gate [B].

    The probe was fitted on image means, so the mean logit is a calibrated image-level decision:
    an image is gated in when ``sigmoid(mean logit) > threshold``. Within a gated image, the
    positions whose logit is above the image's mean are the concept-like ones; they are masked and
    the mask is dilated by ``dilate`` latent pixels.
    """
    mean = logits.mean(dim=(1, 2), keepdim=True)
    gate = torch.sigmoid(mean.flatten()) > threshold
    mask = ((logits > mean) & gate[:, None, None]).float()[:, None]
    if dilate > 0:
        mask = F.max_pool2d(mask, kernel_size=2 * dilate + 1, stride=1, padding=dilate)
    return mask > 0, gate


def perturb_latents(
    latents: torch.Tensor, mask: torch.Tensor, strength: float, generator: torch.Generator
) -> torch.Tensor:
    """Re-noise ``latents`` [B, C, H, W] under ``mask`` [B, 1, H, W]; outside it the values are unchanged."""
    noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
    noise = noise.to(latents.device)
    std = latents.float().std(dim=(1, 2, 3), keepdim=True)
    mixed = math.sqrt(1.0 - strength) * latents.float() + math.sqrt(strength) * std * noise
    return torch.where(mask, mixed.to(latents.dtype), latents)


def in_window(step: int, num_steps: int, start: float, end: float) -> bool:
    """Whether denoising step ``step`` (0-based, of ``num_steps``) lies in the fractional window."""
    return math.floor(start * num_steps) <= step < math.ceil(end * num_steps)


def _hp_number(hp: dict, key: str, where: str, lo: float, hi: float, integer: bool = False) -> None:
    value = hp.get(key)
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        raise PackError(where, f"hyperparameters.{key}", f"must be {'an integer' if integer else 'a number'} in "
                        f"[{lo}, {hi}], got {value!r}", f"re-calibrate, or pass --set {key}=VALUE within range")


def validate(pack: ConceptPack, where: str) -> None:
    hp = pack.hyperparameters
    _hp_number(hp, "embed_dim", where, 1, 65536, integer=True)
    _hp_number(hp, "threshold", where, 0.0, 1.0)
    _hp_number(hp, "strength", where, 0.0, 1.0)
    _hp_number(hp, "start", where, 0.0, 1.0)
    _hp_number(hp, "end", where, 0.0, 1.0)
    _hp_number(hp, "dilate", where, 0, 16, integer=True)
    _hp_number(hp, "seed", where, 0, 2**63 - 1, integer=True)
    if hp["start"] >= hp["end"]:
        raise PackError(where, "hyperparameters.start", f"window start {hp['start']} is not before end {hp['end']}",
                        "set 0 <= start < end <= 1")
    layers = hp.get("layers")
    if not (isinstance(layers, list) and layers and all(isinstance(x, str) for x in layers)):
        raise PackError(where, "hyperparameters.layers", f"expected a non-empty list of names, got {layers!r}",
                        "re-calibrate; layers name cross-attention processors (keys ending in attn2.processor)")
    expected = {f"probe_weight.{i}" for i in range(len(layers))} | {f"probe_bias.{i}" for i in range(len(layers))}
    if set(pack.tensors) != expected:
        raise PackError(where, "tensors", f"expected {sorted(expected)}, got {sorted(pack.tensors)}",
                        "re-calibrate the pack with `erasekit calibrate --method irece`")
    for i in range(len(layers)):
        w, b = pack.tensors[f"probe_weight.{i}"], pack.tensors[f"probe_bias.{i}"]
        if w.ndim != 1 or w.shape[0] < 1:
            raise PackError(where, f"tensors.probe_weight.{i}", f"shape {list(w.shape)} is not [C]", "re-calibrate")
        if list(b.shape) != [1]:
            raise PackError(where, f"tensors.probe_bias.{i}", f"shape {list(b.shape)} is not [1]", "re-calibrate")


def fit_probe(features: np.ndarray, labels: np.ndarray, C: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic probe on mean-pooled queries ``[N, C]``; returns (weight, bias) in raw query units.

    Fitted on image means, applied per position: the mean of per-position logits is the image
    logit, so positions that look like the concept score above the image and the rest below.
    """
    from sklearn.linear_model import LogisticRegression

    mean, scale = features.mean(0), features.std(0) + 1e-6
    clf = LogisticRegression(C=C, max_iter=3000).fit((features - mean) / scale, labels)
    weight = clf.coef_[0] / scale
    bias = clf.intercept_[0] - float((clf.coef_[0] * mean / scale).sum())
    return torch.tensor(weight, dtype=torch.float32), torch.tensor([bias], dtype=torch.float32)


register_method(MethodSpec(name=METHOD, family="diffusion", validate=validate))
