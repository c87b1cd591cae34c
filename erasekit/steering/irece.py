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
barely localise words). So the key is learned instead: logistic probes on the cross-attention
*queries*, fitted on the generator's own activations while it draws forget prompts (concept) vs
retain prompts (no concept) -- one probe per denoising step over all layers' mean queries (what
a concept looks like at step 2 is not what it looks like at step 15; a single probe for all steps
gated only 8-25 % of the textual-inversion images that showed the concept). The weights are
directions in query space, i.e. keys the concept's pixels attend to; they read the image, so they
see the concept whatever carried it in (text, a learned embedding, an inverted latent). Since
``to_q`` is linear the probe is folded in front of it (``h . W_q^T w``): no query is recomputed.

Gate: an image is *latched* at the first step of a decision window whose image logit (mean over
positions) exceeds that step's threshold. Thresholds are calibrated on held-out retain
generations (other prompts, other seeds) so that at most ``gate_fpr`` of them would latch over the
whole window: images that do not show the concept stay bit-identical.

Perturbation of latched images, under the mask (positions whose logit is above the image mean,
dilated): (1) the cross-attention output of the conditional branch is replaced by the
unconditional branch's until ``cut_end`` -- the prompt, or a learned embedding inside it, stops
drawing there (latent re-noising alone let textual inversion re-draw the concept after the window:
measured); (2) inside ``[start, end)`` masked latents are partially re-noised,
``z <- sqrt(1 - s) z + sqrt(s) std(z) eps`` with ``eps`` from a seeded generator (this is what
undoes an inverted latent, which has no text to cut). Outside the mask nothing changes.

All choices are pack hyperparameters (see ``DEFAULTS``) tuned on the world benchmark.

SD3 (``denoiser_family="sd3"``): the same probes, gate, mask and re-noising, listening to each
``JointTransformerBlock``'s joint attention instead of ``attn2`` -- the probe is folded in front of
``to_q`` applied to the *image* tokens; the mask lives on the image-token (patch) grid and is mapped
back to the latent grid by nearest-neighbour upsampling (each token is ``p x p`` latent pixels);
the cut swaps the conditional branch's image-token attention output for the unconditional one's
at masked tokens (see ``_JointCaptureProcessor`` in ``erasekit/integrations/diffusers.py``). It is
plumbing verified on a tiny random SD3 only; nothing about its efficacy has been measured.

CogVideoX (``denoiser_family="cogvideox"``, text-to-video): the same again on each
``CogVideoXBlock``'s joint attention ``attn1`` -- the probe reads ``to_q`` of the *video* tokens
(before the per-head ``norm_q`` and the rotary embedding, which are not linear / depend on the
position); the mask lives on the ``(frame, h/p, w/p)`` token grid (``frame`` is a latent frame,
or ``patch_size_t`` of them on CogVideoX 1.5) and is mapped back to the latent grid ``[F, H, W]``
by nearest-neighbour upsampling (``video_maps_to_latent``, ``build_video_mask``); re-noising
acts on ``[B, F, C, H, W]`` latents, with one noise scale per video. Verified as plumbing on a
tiny random CogVideoX only; nothing about its efficacy has been measured.
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
#: calibration). Gate: one probe per calibration step; an image is *latched* (the concept is
#: forming in it) at the first step of ``[decide_start, decide_end)`` whose image logit exceeds
#: that step's threshold -- calibrated on held-out retain generations for a false-positive rate of
#: ``gate_fpr`` (``threshold``: a probability instead, bypassing calibration; 0.0 latches always).
#: Perturbation of latched images: masked latents re-noised by fraction ``strength`` in
#: ``[start, end)``; the cross-attention output of masked positions replaced by the unconditional
#: branch's (the text stops drawing there) until ``cut_end`` (``cut``: "mask", "image" or "none");
#: ``mask``: "above_mean" (positions whose concept logit is above the image's mean) or "image";
#: ``dilate``: mask dilation in latent pixels; ``seed``: noise seed.
DEFAULTS: dict[str, object] = {
    "layers": "all", "threshold": None, "gate_fpr": 0.01, "decide_start": 0.2, "decide_end": 0.5,
    "strength": 0.9, "start": 0.0, "end": 0.5, "cut": "mask", "cut_end": 1.0, "mask": "above_mean",
    "dilate": 1, "seed": 0,
}
CUT_MODES = ("mask", "image", "none")
#: Denoiser families IRECE can listen to (``hyperparameters.denoiser_family``, recorded at calibration):
#: ``"unet"`` -- SD1.x/SDXL UNets, probes on the cross-attention (``attn2``) queries; ``"sd3"`` --
#: SD3's ``SD3Transformer2DModel``, probes on the image-token queries of its joint attention. Packs
#: written before the field existed were all UNet packs, so a missing field reads as ``"unet"``.
#: ``"cogvideox"`` -- ``CogVideoXTransformer3DModel`` (text-to-video), probes on the video-token queries.
DENOISER_FAMILIES = ("unet", "sd3", "cogvideox")
MASK_MODES = ("above_mean", "image")


def probe_logits(query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Concept logit per image position, ``query . weight + bias``; [B, Q, C] -> [B, Q]."""
    return query.float() @ weight.float() + bias.float()


def calibration_step(step: int, num_steps: int, probe_steps: int) -> int:
    """The probe (of ``probe_steps`` fitted ones) for denoising step ``step`` of ``num_steps``."""
    if num_steps <= 1:
        return 0
    return min(probe_steps - 1, max(0, round(step * (probe_steps - 1) / (num_steps - 1))))


def fit_step_probes(features: np.ndarray, labels: np.ndarray, C: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One logistic probe per step on mean-pooled queries ``[N, S, F]``; returns weight [S, F], bias [S]."""
    weights, biases = [], []
    for t in range(features.shape[1]):
        w, b = fit_probe(features[:, t], labels, C=C)
        weights.append(w.numpy())
        biases.append(float(b[0]))
    return np.stack(weights), np.asarray(biases, dtype=np.float32)


def gate_thresholds(negatives: np.ndarray, fpr: float, lo: int, hi: int) -> np.ndarray:
    """Per-step logit thresholds from held-out negative image logits ``[N, S]``.

    Each step's logits are standardised by the negatives' mean and std; an image is latched when
    any step in ``[lo, hi)`` exceeds ``z``, where ``z`` is the ``1 - fpr`` quantile (the maximum
    when ``fpr * N < 1``) of the negatives' maximum standardised logit over that range -- so the
    held-out false-positive rate of the whole decision window is at most ``fpr``.
    """
    mu, sd = negatives.mean(0), negatives.std(0) + 1e-6
    score = ((negatives - mu) / sd)[:, lo:max(hi, lo + 1)].max(1)
    z = float(np.max(score)) if fpr * len(score) < 1 else float(np.quantile(score, 1.0 - fpr))
    return (mu + z * sd).astype(np.float32)


def maps_to_latent(maps: list[torch.Tensor], size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Average flat per-position maps ``[B, h*w]`` of several resolutions at latent ``size`` -> [B, H, W].

    ``mode="nearest"`` is for patch grids (a DiT's image tokens each cover ``p x p`` latent pixels
    exactly): every latent pixel takes its patch's logit, so max-pooling the mask back onto the
    token grid (the text cut) returns the same tokens.
    """
    height, width = size
    out = None
    for m in maps:
        ratio = math.sqrt(height * width / m.shape[1])
        h, w = round(height / ratio), round(width / ratio)
        if h * w != m.shape[1]:
            raise ValueError(f"attention map of {m.shape[1]} positions does not tile a {height}x{width} latent")
        grid = m.float().view(-1, 1, h, w)
        if mode == "nearest":
            up = F.interpolate(grid, size=(height, width), mode="nearest")
        else:
            up = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        out = up if out is None else out + up
    if out is None:
        raise ValueError("no attention maps captured")
    return (out / len(maps))[:, 0]


def video_maps_to_latent(maps: list[torch.Tensor], size: tuple[int, int, int], patch_t: int = 1) -> torch.Tensor:
    """Average flat per-token maps ``[B, f*h*w]`` of a video DiT at latent ``size`` ``(F, H, W)`` -> [B, F, H, W].

    The tokens are ordered ``(frame, row, column)`` (CogVideoX's patch embedding); each covers
    ``p x p`` latent pixels of ``patch_t`` latent frames (1, or CogVideoX 1.5's ``patch_size_t``),
    so ``f = F / patch_t`` and the grid is upsampled by nearest neighbour: every latent voxel takes
    its token's logit, and max-pooling the mask back onto the token grid (the text cut) returns
    the same tokens.
    """
    frames, height, width = size
    if frames % patch_t:
        raise ValueError(f"{frames} latent frames are not a multiple of the temporal patch {patch_t}")
    out = None
    for m in maps:
        ratio = math.sqrt(frames * height * width / (patch_t * m.shape[1]))
        f, h, w = frames // patch_t, round(height / ratio), round(width / ratio)
        if f * h * w != m.shape[1]:
            raise ValueError(f"token map of {m.shape[1]} positions does not tile a {frames}x{height}x{width} latent")
        up = F.interpolate(m.float().view(-1, 1, f, h, w), size=(frames, height, width), mode="nearest")
        out = up if out is None else out + up
    if out is None:
        raise ValueError("no attention maps captured")
    return (out / len(maps))[:, 0]


def build_video_mask(logits: torch.Tensor, rows: torch.Tensor, dilate: int, mode: str = "above_mean") -> torch.Tensor:
    """Mask [B, F, 1, H, W] (broadcasts over ``[B, F, C, H, W]`` latents) from logits [B, F, H, W].

    As :func:`build_mask`, with the mean taken over the whole video (the probe was fitted on video
    means, all frames' tokens together); dilation is spatial, within each frame.
    """
    b, f, height, width = logits.shape
    if mode == "image":
        mask = torch.ones_like(logits) * rows[:, None, None, None].to(logits.dtype)
    else:
        mean = logits.mean(dim=(1, 2, 3), keepdim=True)
        mask = ((logits > mean) & rows[:, None, None, None]).float()
    if dilate > 0 and mode != "image":
        mask = F.max_pool2d(mask.view(b * f, 1, height, width), kernel_size=2 * dilate + 1, stride=1,
                            padding=dilate).view(b, f, height, width)
    return (mask > 0)[:, :, None]


def build_mask(logits: torch.Tensor, rows: torch.Tensor, dilate: int, mode: str = "above_mean") -> torch.Tensor:
    """Mask [B, 1, H, W] over latched ``rows`` [B] from per-position concept logits [B, H, W].

    The per-step probe was fitted on image means, so within an image the positions whose logit is
    above the image's mean are the concept-like ones (``mode="above_mean"``); ``"image"`` masks
    the whole latched image. The mask is dilated by ``dilate`` latent pixels.
    """
    if mode == "image":
        mask = torch.ones_like(logits)[:, None] * rows[:, None, None, None].to(logits.dtype)
    else:
        mean = logits.mean(dim=(1, 2), keepdim=True)
        mask = ((logits > mean) & rows[:, None, None]).float()[:, None]
    if dilate > 0 and mode != "image":
        mask = F.max_pool2d(mask, kernel_size=2 * dilate + 1, stride=1, padding=dilate)
    return mask > 0


def perturb_latents(
    latents: torch.Tensor, mask: torch.Tensor, strength: float, generator: torch.Generator
) -> torch.Tensor:
    """Re-noise ``latents`` [B, C, H, W] under ``mask`` [B, 1, H, W]; outside it the values are unchanged.

    Video latents ``[B, F, C, H, W]`` take a mask ``[B, F, 1, H, W]``; the noise scale is each
    video's std over all its frames.
    """
    noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
    noise = noise.to(latents.device)
    std = latents.float().std(dim=tuple(range(1, latents.ndim)), keepdim=True)
    mixed = math.sqrt(1.0 - strength) * latents.float() + math.sqrt(strength) * std * noise
    return torch.where(mask, mixed.to(latents.dtype), latents)


def gate_margin(captured: list[torch.Tensor], bias: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per image ``[B]``: the step's image logit (each layer's position-mean logit, summed, plus the
    step probe's bias) minus the step's gate threshold; above 0 latches the image."""
    return sum(m.mean(1) for m in captured) + bias - threshold


def _cut(out: torch.Tensor, positions: torch.Tensor, images: int) -> torch.Tensor:
    uncond, cond = out[:images], out[images:]
    return torch.cat([uncond, torch.where(positions.to(out.device), uncond, cond)])


def cut_image_tokens(out: torch.Tensor, mask: torch.Tensor, images: int) -> torch.Tensor:
    """The text cut: an attention output ``[2B, N, C]`` under CFG (``[uncond, cond]``) whose conditional
    rows take the unconditional rows' values at the image tokens ``mask`` ``[B, 1, H, W]`` covers.

    The mask is max-pooled onto the layer's token grid (the latent's aspect ratio, N tokens); a
    layer whose token count fits no such grid is returned as is.
    """
    height, width = mask.shape[-2:]
    ratio = (height * width / out.shape[1]) ** 0.5
    h, w = round(height / ratio), round(width / ratio)
    if h * w != out.shape[1]:
        return out
    return _cut(out, F.adaptive_max_pool2d(mask.float(), (h, w)).flatten(1)[..., None] > 0, images)


def cut_video_tokens(out: torch.Tensor, mask: torch.Tensor, images: int, patch_t: int = 1) -> torch.Tensor:
    """:func:`cut_image_tokens` for video tokens: ``mask`` ``[B, F, 1, H, W]`` pooled onto the
    ``(F / patch_t, H/p, W/p)`` token grid."""
    frames, height, width = mask.shape[1], mask.shape[-2], mask.shape[-1]
    f = frames // patch_t
    ratio = (f * height * width / out.shape[1]) ** 0.5 if f else 0.0
    h, w = (round(height / ratio), round(width / ratio)) if ratio else (0, 0)
    if f * h * w != out.shape[1]:
        return out
    grid = mask.float()[:, :, 0][:, None]  # [B, 1, F, H, W]
    return _cut(out, F.adaptive_max_pool3d(grid, (f, h, w)).flatten(1)[..., None] > 0, images)


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
    if hp.get("threshold") is not None:
        _hp_number(hp, "threshold", where, 0.0, 1.0)
    for key in ("gate_fpr", "decide_start", "decide_end", "strength", "start", "end", "cut_end"):
        _hp_number(hp, key, where, 0.0, 1.0)
    _hp_number(hp, "dilate", where, 0, 16, integer=True)
    _hp_number(hp, "seed", where, 0, 2**63 - 1, integer=True)
    for lo, hi in (("start", "end"), ("decide_start", "decide_end")):
        if hp[lo] >= hp[hi]:
            raise PackError(where, f"hyperparameters.{lo}", f"window start {hp[lo]} is not before end {hp[hi]}",
                            f"set 0 <= {lo} < {hi} <= 1")
    for key, allowed in (("cut", CUT_MODES), ("mask", MASK_MODES)):
        if hp.get(key) not in allowed:
            raise PackError(where, f"hyperparameters.{key}", f"must be one of {list(allowed)}, got {hp.get(key)!r}",
                            f"pass --set {key}={allowed[0]}")
    family = hp.get("denoiser_family", "unet")
    if family not in DENOISER_FAMILIES:
        raise PackError(where, "hyperparameters.denoiser_family", f"must be one of {list(DENOISER_FAMILIES)}, got "
                        f"{family!r}", "re-calibrate the IRECE pack on a UNet (SD1.x/SDXL), SD3 or CogVideoX pipeline")
    layers = hp.get("layers")
    if not (isinstance(layers, list) and layers and all(isinstance(x, str) for x in layers)):
        raise PackError(where, "hyperparameters.layers", f"expected a non-empty list of names, got {layers!r}",
                        "re-calibrate; layers name attention processors (UNet: keys ending in attn2.processor; "
                        "SD3: transformer_blocks.N.attn.processor; CogVideoX: transformer_blocks.N.attn1.processor)")
    expected = {f"probe_weight.{i}" for i in range(len(layers))} | {"probe_bias", "gate_threshold"}
    if set(pack.tensors) != expected:
        raise PackError(where, "tensors", f"expected {sorted(expected)}, got {sorted(pack.tensors)}",
                        "re-calibrate the pack with `erasekit calibrate --method irece`")
    bias = pack.tensors["probe_bias"]
    if bias.ndim != 1 or bias.shape[0] < 1:
        raise PackError(where, "tensors.probe_bias", f"shape {list(bias.shape)} is not [steps]", "re-calibrate")
    steps = bias.shape[0]
    if list(pack.tensors["gate_threshold"].shape) != [steps]:
        raise PackError(where, "tensors.gate_threshold", f"shape {list(pack.tensors['gate_threshold'].shape)} is "
                        f"not [{steps}]", "re-calibrate")
    for i in range(len(layers)):
        w = pack.tensors[f"probe_weight.{i}"]
        if w.ndim != 2 or w.shape[0] != steps or w.shape[1] < 1:
            raise PackError(where, f"tensors.probe_weight.{i}", f"shape {list(w.shape)} is not [{steps}, C]",
                            "re-calibrate")


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
