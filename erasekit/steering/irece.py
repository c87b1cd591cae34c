"""IRECE: find where a concept is forming by cross-attention, and perturb the latents there.

M-ErasureBench (arXiv 2512.22877) shows that an erased concept comes back through learned
embeddings and inverted latents, which never spell the concept in text, so text-side erasers
(CGCE included) cannot see it. IRECE looks at the image instead: pixels that are forming the
concept attend strongly to the concept's keys.

Localisation (our choice, justified): the concept's *calibrated embedding* ``C`` (its token
rows in the generator's own conditioning) is projected by each chosen cross-attention layer's
``to_k`` and appended to the prompt's keys; the share of each image query's softmax mass that
lands on those extra keys is the concept map. This works whether the concept arrived by text,
by a learned token or through an inverted latent, because it reads the image queries, and it
is calibrated in absolute terms (a share of attention), so a fixed threshold means the same on
every image. The maps of the chosen layers are upsampled to latent size and averaged.

Perturbation (our choice): inside a window of denoising steps, masked latents are partially
re-noised, ``z <- sqrt(1 - s) z + sqrt(s) std(z) eps`` with ``eps`` from a seeded generator, so
the concept has to re-form from noise while the unmasked image is untouched (bit-identical).

All choices are pack hyperparameters (see ``DEFAULTS``) tuned on the world benchmark.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from erasekit.errors import PackError
from erasekit.guardrails.methods import MethodSpec, register_method

if TYPE_CHECKING:
    from erasekit.guardrails.pack import ConceptPack

METHOD = "irece"
#: ``layers``: "all" or a list of cross-attention processor names; ``threshold``: share of
#: attention on the concept keys above which a latent pixel is masked; ``strength``: re-noise
#: fraction s; ``start``/``end``: step window as fractions of the schedule; ``dilate``: mask
#: dilation in latent pixels; ``seed``: noise seed.
DEFAULTS: dict[str, object] = {
    "layers": "all", "threshold": 0.3, "strength": 0.5, "start": 0.0, "end": 0.5, "dilate": 1, "seed": 0,
}


def concept_attention_share(
    query: torch.Tensor, prompt_keys: torch.Tensor, concept_keys: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """Share of each query's attention that goes to ``concept_keys`` when they join the prompt's keys.

    Shapes: ``query`` [B, Q, H*d], ``prompt_keys`` [B, T, H*d], ``concept_keys`` [K, H*d];
    returns [B, Q] in [0, 1], averaged over heads.
    """
    b, q_len, inner = query.shape
    d = inner // heads
    qh = query.view(b, q_len, heads, d).transpose(1, 2)  # B H Q d
    kp = prompt_keys.view(b, -1, heads, d).transpose(1, 2)  # B H T d
    kc = concept_keys.view(-1, heads, d).transpose(0, 1)  # H K d
    lp = torch.matmul(qh, kp.transpose(-1, -2)) * scale  # B H Q T
    lc = torch.matmul(qh, kc.transpose(-1, -2).unsqueeze(0)) * scale  # B H Q K
    total = torch.logsumexp(torch.cat([lp, lc], dim=-1), dim=-1)
    share = torch.exp(torch.logsumexp(lc, dim=-1) - total)  # B H Q
    return share.mean(dim=1)


def maps_to_latent(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Average flat attention maps ``[B, h*w]`` of several resolutions at latent ``size`` -> [B, H, W]."""
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


def build_mask(share: torch.Tensor, threshold: float, dilate: int) -> torch.Tensor:
    """Binary mask [B, 1, H, W] where the concept share exceeds ``threshold``, dilated by ``dilate`` pixels."""
    mask = (share > threshold).float()[:, None]
    if dilate > 0:
        mask = F.max_pool2d(mask, kernel_size=2 * dilate + 1, stride=1, padding=dilate)
    return mask > 0


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
    if layers != "all" and not (isinstance(layers, list) and layers and all(isinstance(x, str) for x in layers)):
        raise PackError(where, "hyperparameters.layers", f"expected 'all' or a non-empty list of names, got {layers!r}",
                        "list cross-attention processor names (pipe.unet.attn_processors keys ending in attn2.processor)")
    if set(pack.tensors) != {"concept_embedding"}:
        raise PackError(where, "tensors", f"expected only 'concept_embedding', got {sorted(pack.tensors)}",
                        "re-calibrate the pack with `erasekit calibrate --method irece`")
    emb = pack.tensors["concept_embedding"]
    if emb.ndim != 2 or emb.shape[0] < 1 or emb.shape[1] != hp["embed_dim"]:
        raise PackError(where, "tensors.concept_embedding", f"shape {list(emb.shape)} is not [K, {hp['embed_dim']}]",
                        "re-calibrate the pack")


register_method(MethodSpec(name=METHOD, family="diffusion", validate=validate))
