"""Diffusers adapter: where CGCE and IRECE attach to a pipeline, and the guard users call.

Three diffusers-native mechanisms, no patched pipeline copies:

* a ``diffusers.hooks.ModelHook`` ``pre_forward`` on the denoiser (``pipe.unet`` or
  ``pipe.transformer``) reads ``encoder_hidden_states`` -- the conditioning the generator
  really consumes, uniform across SD1.x, SDXL (penultimate layers of two encoders), SD3, Flux,
  CogVideoX and Wan, and whether the caller passed ``prompt=`` or ``prompt_embeds=`` -- runs
  the CGCE detectors and, for flagged rows only, returns refined embeddings;
* attention processors on the UNet's cross-attention (``attn2``) modules -- or, on SD3, on the
  joint attention (``transformer_blocks.N.attn``) where image and text tokens attend together;
  on CogVideoX on each block's joint attention ``transformer_blocks.N.attn1`` (video + text
  tokens) -- wrap the original processor (whose output is returned untouched) and, during an
  IRECE window, score each image (video) position with the concept's calibrated key (a probe on
  the layer's image/video queries);
* ``callback_on_step_end`` turns those maps into a mask and re-noises the masked latents.

Hooks are inert outside a guarded call or :meth:`DiffusersGuard.erasing` block, so the modules
then compute exactly what the unguarded ones compute.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import HookRegistry, ModelHook

from erasekit.classifiers.cgce import CGCEClassifier
from erasekit.classifiers.guidance import negative_unconditional, refined_unconditional
from erasekit.classifiers.twin import refine
from erasekit.errors import ErasekitError, PackError, PolicyError
from erasekit.guardrails.faults import handle_guard_fault
from erasekit.guardrails.fingerprint import ModelFingerprint, hash_embedding_slice
from erasekit.guardrails.pack import ConceptPack
from erasekit.guardrails.policy import Policy, PolicyEntry
from erasekit.integrations.cast_weights import CastWeights
from erasekit.steering import irece as irece_math

logger = logging.getLogger("erasekit.diffusers")

HOOK_NAME = "erasekit_conditioning"
#: Conditioning tensors remembered per call: a pipeline passes the same tensor at every step,
#: so detection and refinement run once per call; the bound keeps training loops from piling up.
_CACHE_ENTRIES = 8
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
#: Denoiser config keys that hold the width of ``encoder_hidden_states``, per architecture.
_COND_DIM_KEYS = ("cross_attention_dim", "joint_attention_dim", "text_embed_dim", "text_dim")


# ---------------------------------------------------------------------------- pipeline identity
def denoiser_of(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The module that consumes the text conditioning (``unet`` or ``transformer``)."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ErasekitError(type(pipe).__name__, "unet/transformer", "pipeline has no denoiser module",
                        "guard a text-to-image/video pipeline with a `unet` or `transformer` component")


def conditioning_dim(pipe: DiffusionPipeline) -> int | None:
    """Width of the denoiser's ``encoder_hidden_states``, read from its config where it is declared."""
    config = getattr(denoiser_of(pipe), "config", {})
    for key in _COND_DIM_KEYS:
        value = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def fingerprint_pipeline(pipe: DiffusionPipeline) -> ModelFingerprint:
    """Identity of a pipeline's text side: every text encoder's architecture and embedding hash.

    CGCE classifiers and IRECE concept embeddings live in the conditioning space, which the
    text encoders define; a pack from another encoder (or another SDXL second encoder) is refused.
    """
    encoders = [getattr(pipe, n) for n in _TEXT_ENCODERS if isinstance(getattr(pipe, n, None), torch.nn.Module)]
    if not encoders:
        raise ErasekitError(type(pipe).__name__, "text_encoder", "pipeline has no text encoder",
                            "pass a text-conditioned pipeline")
    digest = hashlib.sha256()
    for enc in encoders:
        digest.update(hash_embedding_slice(enc.get_input_embeddings().weight).encode())
    first = encoders[0].config
    text_config = first.get_text_config() if hasattr(first, "get_text_config") else first
    return ModelFingerprint(
        architecture="+".join((enc.config.architectures or [type(enc).__name__])[0] for enc in encoders),
        hidden_size=int(conditioning_dim(pipe) or text_config.hidden_size),
        num_layers=sum(int(getattr(e.config.get_text_config() if hasattr(e.config, "get_text_config") else e.config,
                                   "num_hidden_layers", 0)) for e in encoders),
        vocab_size=int(text_config.vocab_size),
        embedding_sha256=digest.hexdigest(),
    )


def denoiser_sha256(pipe: DiffusionPipeline) -> str:
    """Hash of the denoiser's first weight (IRECE probes its attention queries, so it must match too)."""
    first = next(denoiser_of(pipe).parameters())
    return hash_embedding_slice(first.reshape(first.shape[0], -1))


def cross_attention_processors(pipe: DiffusionPipeline) -> list[str]:
    """Names of the UNet's cross-attention processors (``...attn2.processor``), where IRECE listens."""
    denoiser = denoiser_of(pipe)
    procs = getattr(denoiser, "attn_processors", {})
    return sorted(n for n in procs if n.endswith("attn2.processor"))


def denoiser_family(pipe: DiffusionPipeline) -> str:
    """The denoiser's IRECE family: ``"unet"``, ``"sd3"``, ``"cogvideox"``, or its class name (unsupported).

    IRECE probes a layer's image queries, so a pack only means something on the attention layout
    it was calibrated on; the family is recorded in the pack and checked before anything attaches.
    """
    denoiser = denoiser_of(pipe)
    if denoiser is getattr(pipe, "unet", None):
        return "unet"
    if type(denoiser).__name__ == "SD3Transformer2DModel":
        return "sd3"
    if type(denoiser).__name__ == "CogVideoXTransformer3DModel":
        return "cogvideox"
    return type(denoiser).__name__


def irece_attention_processors(pipe: DiffusionPipeline) -> list[str]:
    """The attention processors IRECE listens to on this pipeline (empty where it is not built).

    UNet: the cross-attention ``attn2`` processors. SD3: each ``JointTransformerBlock``'s joint
    attention ``transformer_blocks.N.attn`` (image + text tokens); SD3.5's extra ``attn2`` (dual
    attention) is image self-attention, which the text never reaches, so it is left out. CogVideoX:
    each ``CogVideoXBlock``'s ``transformer_blocks.N.attn1`` (video + text tokens, its only attention).
    """
    family = denoiser_family(pipe)
    if family == "unet":
        return cross_attention_processors(pipe)
    suffix = {"sd3": ".attn.processor", "cogvideox": ".attn1.processor"}.get(family)
    if suffix is not None:
        procs = getattr(denoiser_of(pipe), "attn_processors", {})
        return sorted(n for n in procs if n.startswith("transformer_blocks.") and n.endswith(suffix))
    return []


def cross_attention_inputs(attn: Any, hidden: torch.Tensor, images: int = 0) -> torch.Tensor:
    """What a cross-attention module feeds ``to_q`` (``[B, positions, C]``), conditional rows only under CFG."""
    h = hidden[images:] if images and hidden.shape[0] == 2 * images else hidden
    if h.ndim == 4:
        b, c, hh, ww = h.shape
        h = h.view(b, c, hh * ww).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
    return h


def cross_attention_queries(attn: Any, hidden: torch.Tensor, images: int = 0) -> torch.Tensor:
    """The queries ``[B, positions, C]`` a cross-attention module computes from ``hidden``.

    Under CFG (``hidden`` has ``2 * images`` rows, ``[uncond, cond]``) only the conditional rows
    are kept: those are the ones that draw what the prompt asks for.
    """
    return attn.to_q(cross_attention_inputs(attn, hidden, images))


# ---------------------------------------------------------------------------- per-call state
@dataclass(eq=False)  # hashed by identity (plan keys)
class _IreceConcept:
    name: str
    probes: dict[str, torch.Tensor]  # layer -> per-step weight [S, C] in query space
    bias: torch.Tensor  # [S]
    gate_threshold: torch.Tensor  # [S] logit thresholds (calibrated), or from ``threshold``
    layers: frozenset[str]
    decide: tuple[float, float]
    strength: float
    start: float
    end: float
    cut: str
    cut_end: float
    mask_mode: str
    dilate: int
    seed: int
    folded: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (W_q^T w, b_q.w)
    #: layer -> per-step (folded row, shift) views of ``folded``: indexing a tensor costs a dispatcher
    #: call per layer per step, a tuple lookup does not (same tensors, same values)
    folded_rows: dict[str, tuple[tuple[torch.Tensor, torch.Tensor], ...]] = field(default_factory=dict)
    #: per-step 0-d views of ``bias`` and ``gate_threshold`` (built once; read every decision step)
    bias_rows: tuple[torch.Tensor, ...] = ()
    gate_rows: tuple[torch.Tensor, ...] = ()

    def __post_init__(self) -> None:
        self.bias_rows = tuple(self.bias.unbind(0))
        self.gate_rows = tuple(self.gate_threshold.unbind(0))

    def fold_at(self, name: str, attn: Any, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(folded[t], shift[t])`` of :meth:`fold`, from a per-layer cache of row views."""
        rows = self.folded_rows.get(name)
        if rows is None:
            folded, shift = self.fold(name, attn)
            rows = self.folded_rows[name] = tuple(zip(folded.unbind(0), shift.unbind(0), strict=True))
        return rows[t]

    def fold(self, name: str, attn: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe moved before ``to_q`` (linear): logits = hidden . (W_q^T w) + b_q . w, no query needed."""
        hit = self.folded.get(name)
        if hit is None:
            weight = self.probes[name].to(attn.to_q.weight.device, torch.float32)  # [S, C_out]
            folded = weight @ attn.to_q.weight.detach().float()  # [S, C_in]
            qb = attn.to_q.bias
            shift = weight @ qb.detach().float() if qb is not None else torch.zeros(weight.shape[0])
            hit = self.folded[name] = (folded, shift.to(folded.device))
        return hit


@dataclass
class CallReport:
    """What the guard did in the last call (for tests, benchmarks and logs)."""

    flagged: dict[str, list[int]] = field(default_factory=dict)  # concept -> flagged conditioning rows
    scores: dict[str, list[float]] = field(default_factory=dict)  # concept -> P(concept) per row
    refine_steps: int = 0
    irece_masked_fraction: dict[str, list[float]] = field(default_factory=dict)  # concept -> per step
    irece_gate: dict[str, list[list[float]]] = field(default_factory=dict)  # concept -> per decision step, logit margin
    irece_latched: dict[str, list[int]] = field(default_factory=dict)  # concept -> images the gate latched
    negative_guided: list[int] = field(default_factory=list)  # uncond rows given a concept's negative embedding
    #: concept -> conditioning rows re-encoded as ``prompt + anchor_text`` before refinement
    anchored: dict[str, list[int]] = field(default_factory=dict)
    #: concepts whose ``anchor_text`` could not apply (no prompt text: ``prompt_embeds`` or ``erasing()``)
    anchor_text_skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _PlanEntry:
    """One IRECE concept's work at one step, decided once per step rather than once per layer."""

    concept: _IreceConcept
    score: bool  # score this step's positions (capture the layer's logits)
    cut: bool  # cut the text at the mask
    t: int  # the concept's calibration step (probe row) for this denoising step


class _CallState:
    """Everything one guarded call (or erasing block) needs; discarded when it ends."""

    def __init__(self, per_prompt: list[frozenset[str]] | None, broadcast: frozenset[str] | None,
                 images_per_prompt: int) -> None:
        self.per_prompt = per_prompt
        self.broadcast = broadcast
        self.images_per_prompt = images_per_prompt
        self.cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.row_masks: dict[tuple[str, int], torch.Tensor] = {}
        self.row_lists: dict[tuple[str, int], list[bool]] = {}
        self.report = CallReport()
        self.step = 0
        self.num_steps: int | None = None
        self.maps: dict[str, list[torch.Tensor]] = {}  # concept -> this step's per-layer position logits
        self.latched: dict[str, torch.Tensor] = {}  # concept -> bool [images]: the concept is forming there
        self.masks: dict[str, torch.Tensor] = {}  # concept -> bool [images, 1, H, W] for the cut
        self.plan: tuple[int, tuple[_PlanEntry, ...]] | None = None  # (step, IRECE plan) cached for the step's layers
        #: active IRECE concept names, sorted (set on the first IRECE use: a call's concepts do not change)
        self.irece_names: tuple[str, ...] | None = None
        #: images in a pipeline call's batch (set by ``DiffusersGuard.__call__``; None in ``erasing()`` blocks,
        #: where the batch layout is the caller's): CGCE negative guidance needs the [uncond, cond] split
        self.call_images: int | None = None
        #: the call's text prompts, one per prompt (``prompt``, and ``prompt_2``/``prompt_3`` where given),
        #: for ``anchor_text``; empty when the call gave no text
        self.prompt_texts: dict[str, list[str]] = {}
        #: the call's options that shape ``encode_prompt``'s output (``clip_skip``, ``max_sequence_length``,
        #: ``lora_scale``)
        self.encode_kwargs: dict[str, Any] = {}

    def active(self) -> frozenset[str]:
        if self.broadcast is not None:
            return self.broadcast
        return frozenset().union(*self.per_prompt) if self.per_prompt else frozenset()

    def rows(self, concept: str, n: int, device: torch.device) -> torch.Tensor:
        """Bool [n]: rows of a denoiser batch of ``n`` whose prompt erases ``concept``."""
        key = (concept, n)
        if key not in self.row_masks:
            self.row_masks[key] = torch.tensor(self.row_flags(concept, n), dtype=torch.bool, device=device)
        return self.row_masks[key]

    def row_flags(self, concept: str, n: int) -> list[bool]:
        """:meth:`rows` on the host, as a list (the IRECE gate reads it without touching the device)."""
        key = (concept, n)
        if key not in self.row_lists:
            if self.broadcast is not None:
                flags = [concept in self.broadcast] * n
            else:
                per_row = [c for c in self.per_prompt for _ in range(self.images_per_prompt)]
                if n % len(per_row):
                    raise ErasekitError(
                        "erase", None, f"cannot map a denoiser batch of {n} rows onto {len(self.per_prompt)} prompts "
                        f"x {self.images_per_prompt} images", "pass one erase list per prompt")
                flags = [concept in per_row[i % len(per_row)] for i in range(n)]  # CFG repeats [uncond, cond]
            self.row_lists[key] = flags
        return self.row_lists[key]


# ---------------------------------------------------------------------------- hooks
class _ConditioningHook(ModelHook):
    """Denoiser ``pre_forward``: CGCE detection and refinement of ``encoder_hidden_states``."""

    def __init__(self, guard: DiffusersGuard) -> None:
        super().__init__()
        self.guard = guard

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        state = self.guard._current()
        if state is None or not self.guard._classifiers:
            return args, kwargs
        if "encoder_hidden_states" in kwargs:
            kwargs["encoder_hidden_states"] = self.guard._condition(state, kwargs["encoder_hidden_states"])
        elif len(args) > 2:
            args = (*args[:2], self.guard._condition(state, args[2]), *args[3:])
        return args, kwargs


class _CaptureProcessor:
    """Wraps a cross-attention processor: scores positions for IRECE when asked, cuts the text where latched.

    Its output is the inner processor's, untouched, unless an IRECE concept latched an image of
    this call: then, at that image's masked positions, the conditional branch's output is replaced
    by the unconditional branch's (the prompt -- or a learned embedding in it -- stops drawing there).
    """

    #: the inner processor returns ``(tokens_out, text_out)`` (joint attention), not one tensor
    tuple_output = False

    # diffusers filters cross_attention_kwargs by this signature; keep it explicit.

    def __init__(self, inner: Any, name: str, guard: DiffusersGuard) -> None:
        self.inner = inner
        self.name = name
        self.guard = guard

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return self._score_and_cut(attn, hidden_states, encoder_hidden_states, out)

    def _score_and_cut(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                       out: Any) -> Any:
        """The IRECE work after the inner processor, shared by every wrapper: score this layer's
        queries in the decision window, cut the text where an image latched."""
        state = self.guard._current()
        if state is None or encoder_hidden_states is None or state.per_prompt is None:
            return out
        plan = self.guard._irece_plan(state)
        if not plan or not self._scores_this_pass(state, hidden_states):
            return out  # most steps of a benign call: no per-layer work at all
        for entry in plan:
            if self.name not in entry.concept.layers:
                continue
            if entry.score:
                self.guard._capture(state, entry, self.name, attn, hidden_states)
            if entry.cut:
                out = self._cut_output(state, entry.concept, out)
        return out

    def _scores_this_pass(self, state: Any, hidden_states: torch.Tensor) -> bool:
        return True

    def _cut_output(self, state: Any, concept: Any, out: Any) -> Any:
        """Cross-attention's output is the text's contribution itself: cut it. Joint attention
        returns ``(image_or_video_out, text_out)``: cut the image/video tokens' output only."""
        if not self.tuple_output:
            return self.guard._cut(state, concept, out)
        if not isinstance(out, tuple):
            return out
        return (self.guard._cut(state, concept, out[0]), *out[1:])


class _JointCaptureProcessor(_CaptureProcessor):
    """Wraps an SD3 joint-attention processor: the same scoring and text cut, on the image tokens.

    The inner processor receives the image tokens as ``hidden_states`` and the text tokens as
    ``encoder_hidden_states``, attends over both together and returns ``(image_out, text_out)``.
    Scoring folds the probe in front of ``attn.to_q`` applied to the image tokens, exactly as on
    the UNet. The cut replaces, for latched images at masked image tokens, the conditional
    branch's ``image_out`` by the unconditional branch's (SD3 runs CFG as an ``[uncond, cond]``
    batch); ``text_out`` is returned untouched.

    Why the whole image-token output and not only the text keys' share of it: SD3 computes joint
    attention in one fused ``scaled_dot_product_attention`` whose softmax normalises over image
    and text keys together, so the text's contribution cannot be subtracted from the output
    without the attention maps (or a second attention pass with the text keys swapped for the
    unconditional ones, which doubles the layer's cost at every cut step). Taking the
    unconditional row is what the UNet cut does too -- there ``attn2``'s output *is* the text's
    contribution -- and here it is slightly stronger: the masked tokens also take the
    unconditional branch's view of the image context. It costs one ``torch.where`` per layer, no
    attention map is materialised, and tokens outside the mask keep the conditional output.
    """

    tuple_output = True

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 ip_hidden_states: torch.Tensor | None = None, **kwargs: Any) -> Any:
        # Attention.forward passes only keyword arguments named in this signature: forward the
        # optional ones (IP-adapter processors take them) only when the pipeline gave them.
        extra = {k: v for k, v in (("temb", temb), ("ip_hidden_states", ip_hidden_states)) if v is not None}
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **extra, **kwargs)
        return self._score_and_cut(attn, hidden_states, encoder_hidden_states, out)

    def _scores_this_pass(self, state: Any, hidden_states: torch.Tensor) -> bool:
        # Under CFG only the [uncond, cond] pass is scored and cut; skip-layer guidance's extra
        # conditional-only pass (``skip_guidance_layers``) would otherwise count twice per step.
        return not (getattr(self.guard.pipe, "do_classifier_free_guidance", False)
                    and hidden_states.shape[0] != 2 * self.guard._images(state))


class _VideoCaptureProcessor(_CaptureProcessor):
    """Wraps a CogVideoX joint-attention processor (``attn1``): scoring and text cut on the video tokens.

    ``CogVideoXAttnProcessor2_0`` receives the video tokens as ``hidden_states`` and the text
    tokens as ``encoder_hidden_states``, concatenates them (text first), attends over both and
    returns ``(video_out, text_out)``.

    What the probe reads: ``attn.to_q(video tokens)`` -- the linear query projection of the
    block's normalised, timestep-modulated video tokens, *before* the per-head ``norm_q``
    LayerNorm and before the rotary embedding (CogVideoX 1.x applies both to ``q`` inside the
    processor). That is the last point where the query is linear in the processor's input, so the
    probe folds in front of ``to_q`` as on the UNet and SD3, and it is what the calibration
    recorder reads too (``cross_attention_queries`` on the same ``hidden_states``): guard and
    calibration see exactly the same quantity. Reading after the rotary embedding would make the
    probe depend on each token's position, not only on what is drawn there.

    The cut: for latched videos, at masked video tokens, the conditional branch's ``video_out``
    is replaced by the unconditional branch's (CogVideoX runs CFG as an ``[uncond, cond]``
    batch); ``text_out`` is returned untouched. As on SD3 the attention is one fused
    ``scaled_dot_product_attention`` over video and text keys, so the text's share cannot be
    subtracted without materialising the attention maps (see ``_JointCaptureProcessor``).
    """

    tuple_output = True

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None,
                 **kwargs: Any) -> Any:
        # Attention.forward passes only keyword arguments named in this signature, so the rotary
        # embedding (CogVideoX 1.5, 5B) must be named here; forwarded only when the pipeline gave one.
        extra = {"image_rotary_emb": image_rotary_emb} if image_rotary_emb is not None else {}
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **extra, **kwargs)
        return self._score_and_cut(attn, hidden_states, encoder_hidden_states, out)


_CAPTURE_PROCESSORS = {"unet": _CaptureProcessor, "sd3": _JointCaptureProcessor, "cogvideox": _VideoCaptureProcessor}


# ---------------------------------------------------------------------------- the guard
#: pipeline-call options that change what ``encode_prompt`` returns, passed on when ``anchor_text`` re-encodes
_ENCODE_OPTIONS = ("clip_skip", "max_sequence_length")
#: call options whose ``scale`` is the LoRA scale a pipeline hands to ``encode_prompt`` (``lora_scale``)
_ATTENTION_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")


def _prompt_texts(args: tuple, kwargs: dict, num_prompts: int | None) -> dict[str, list[str]]:
    """The call's text prompts (``prompt`` and, where given, ``prompt_2``/``prompt_3``), one per prompt."""
    prompt = kwargs.get("prompt", args[0] if args else None)
    if not num_prompts or not (isinstance(prompt, str) or (isinstance(prompt, list)
                                                              and all(isinstance(p, str) for p in prompt))):
        return {}
    fields = {"prompt": prompt}
    for key in ("prompt_2", "prompt_3"):
        value = kwargs.get(key)
        if isinstance(value, str) or (isinstance(value, list) and len(value) == num_prompts):
            fields[key] = value
    return {key: [value] * num_prompts if isinstance(value, str) else list(value) for key, value in fields.items()}


def _append(prompt: str, texts: list[str]) -> str:
    """``prompt`` followed by each anchor text; a space goes in unless the text starts with punctuation."""
    for text in texts:
        prompt = prompt + (text if text[:1] in " ,.;:" else " " + text)
    return prompt


_ANCHOR_TEXT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _anchor_text_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None:
        return None
    dtype = _ANCHOR_TEXT_DTYPES.get(value) if isinstance(value, str) else value
    if dtype not in _ANCHOR_TEXT_DTYPES.values():
        raise ErasekitError("guard", "anchor_text_dtype", f"unsupported precision {value!r}",
                            f"pass None (the pipeline's own) or one of {', '.join(_ANCHOR_TEXT_DTYPES)}")
    return dtype


class DiffusersGuard:
    """A diffusers pipeline with concept erasure, called exactly like the pipeline.

    Args:
        pipe: the pipeline to guard; hooks attach to its modules until :meth:`detach`.
        packs: ``cgce`` and/or ``irece`` packs (objects or directories) for this pipeline.
        policy: which concepts are mandatory; by default every pack's concept is optional.
        mandatory: shortcut to mark concepts mandatory without writing a policy.
        anchor_text_dtype: precision the text encoder runs in (under ``torch.autocast``) when
            ``anchor_text`` re-encodes flagged prompts; ``None`` (default) runs the pipeline's own.
            The re-encoding is one text-encoder pass per flagged call, and refinement then moves its
            rows far more than bf16 rounding does: ``"bfloat16"`` makes that pass cheaper on CPUs with
            native bf16, where a float32 pipeline's text encoder weighs most (docs/diffusion.md has
            the measured cost and erasure). The guard then keeps a copy of a float32 text encoder's
            linear weights in that precision (half their float32 size, made at the first anchored
            call) so the pass does not cast them every time. Benign calls never re-encode.

    ``guard(prompt, erase=[...])`` erases the listed concepts (plus the mandatory ones) for every
    prompt; ``erase=[[...], [...]]`` gives one list per prompt. Use as a context manager to
    detach on exit.
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        packs: Sequence[ConceptPack | str | Path] = (),
        policy: Policy | None = None,
        mandatory: Sequence[str] = (),
        anchor_text_dtype: torch.dtype | str | None = None,
    ) -> None:
        self.pipe = pipe
        self.anchor_text_dtype = _anchor_text_dtype(anchor_text_dtype)
        #: the text encoders' linear weights in ``anchor_text_dtype``, made at the first anchored call
        self._cast_weights = CastWeights(self.anchor_text_dtype) if self.anchor_text_dtype else None
        self._lock = threading.RLock()
        self._local = threading.local()  # each thread sees only its own calls/blocks
        self._attached = False
        self.last_report: CallReport | None = None
        loaded = [self._load(p, i) for i, p in enumerate(packs)]
        if policy is not None:
            for entry in policy.entries.values():
                if entry.pack:
                    loaded += self._load_policy_entry(entry)
        self._check_packs(loaded)
        names = sorted({p.name for p in loaded})
        if policy is not None and mandatory:
            raise PolicyError("guard", "mandatory", "both policy= and mandatory= given",
                              "mark mandatory concepts in the policy (mandatory: true)")
        if policy is None:
            unknown = sorted(set(mandatory) - set(names))
            if unknown:
                raise PolicyError("guard", "mandatory", f"mandatory concept {unknown[0]!r} has no pack",
                                  f"pass a pack for it; loaded concepts: {', '.join(names) or 'none'}")
            policy = Policy([PolicyEntry(n, None, n in set(mandatory)) for n in names])
        else:
            missing = sorted(policy.concepts - set(names))
            if missing:
                raise ErasekitError("policy", f"concepts.{missing[0]}", "no pack loaded for this concept",
                                    "give the policy entry a pack path or pass the pack in packs=")
        self.policy = policy
        #: run-time failures per concept (classifier errors), whatever on_error decided
        self.fault_counts: dict[str, int] = {}
        self._classifiers = {p.name: CGCEClassifier.from_pack(p) for p in loaded if p.method == "cgce"}
        self._irece = {p.name: self._irece_concept(p) for p in loaded if p.method == "irece"}
        negative = sorted(n for n, c in self._classifiers.items()
                          if c.negative_embedding is not None or c.negative_from_refinement)
        if negative and self._irece:  # refused before anything attaches
            raise PackError(f"CGCE pack {negative[0]!r}", "hyperparameters.negative_guidance",
                            f"negative guidance (on for {negative}) cannot be combined with IRECE packs "
                            f"({sorted(self._irece)}): IRECE's text cut copies the unconditional branch into "
                            "latched images, and negative guidance makes that branch the concept itself",
                            "set negative_guidance=false on those CGCE packs, or guard without the IRECE packs")
        #: maps back onto the latent grid: UNet maps are coarser feature maps (bilinear, as before);
        #: SD3's are patch grids, each token exactly p x p latent pixels (nearest).
        self._upsample = "nearest" if denoiser_family(pipe) == "sd3" else "bilinear"
        #: CogVideoX: latents [B, F, C, H, W]; tokens cover ``patch_size_t`` latent frames (1 if unset).
        self._video = denoiser_family(pipe) == "cogvideox"
        self._patch_t = int(getattr(denoiser_of(pipe).config, "patch_size_t", None) or 1) if self._video else 1
        self.packs = loaded
        self.attach()

    # -------------------------------------------------------------- loading and checks
    def _load(self, pack: ConceptPack | str | Path, index: int | str) -> ConceptPack:
        if isinstance(pack, ConceptPack):
            return pack
        if isinstance(pack, str | Path):
            return ConceptPack.from_pretrained(pack)
        raise ErasekitError("guard", f"packs[{index}]", f"expected a ConceptPack or a directory, got {type(pack).__name__}",
                            "pass ConceptPack objects or pack directory paths")

    def _load_policy_entry(self, entry: PolicyEntry) -> list[ConceptPack]:
        """A policy's ``pack`` is one pack directory, or a folder of them (e.g. ``red/cgce``, ``red/irece``)."""
        root = Path(entry.pack)
        if root.is_dir() and not (root / "manifest.json").exists():
            subdirs = sorted(d for d in root.iterdir() if (d / "manifest.json").is_file())
            packs = [ConceptPack.from_pretrained(d) for d in subdirs] or [ConceptPack.from_pretrained(root)]
        else:
            packs = [ConceptPack.from_pretrained(root)]
        for pack in packs:
            if pack.name != entry.concept:
                raise PolicyError("policy", f"concepts.{entry.concept}.pack",
                                  f"{pack.source} holds concept {pack.name!r}", "point the entry at that concept's pack")
        return packs

    def _check_packs(self, packs: list[ConceptPack]) -> None:
        fingerprint = fingerprint_pipeline(self.pipe)
        dim = conditioning_dim(self.pipe)
        seen: set[tuple[str, str]] = set()
        for pack in packs:
            where = str(pack.source or f"pack {pack.name!r}")
            if pack.spec.family != "diffusion":
                raise PackError(where, "method", f"method {pack.method!r} is not a diffusion method",
                                "pass cgce or irece packs to a diffusers guard")
            if (pack.name, pack.method) in seen:
                raise PackError(where, "concept", f"two {pack.method} packs for concept {pack.name!r}",
                                "pass one pack per concept and method")
            seen.add((pack.name, pack.method))
            if pack.method == "irece":  # before the fingerprint: the family is the error that says why
                self._check_irece_family(pack, where)
            pack.check_model(fingerprint)
            want = pack.hyperparameters.get("embed_dim")
            if dim is not None and want != dim:
                raise PackError(where, "hyperparameters.embed_dim", f"pack reads {want}-wide conditioning but the "
                                f"denoiser consumes {dim}", "calibrate the pack on this pipeline")
            if pack.method == "irece":
                self._check_irece(pack, where)

    def _check_irece_family(self, pack: ConceptPack, where: str) -> None:
        family = denoiser_family(self.pipe)
        if family not in irece_math.DENOISER_FAMILIES:
            raise PackError(where, "method", f"IRECE localises with UNet cross-attention (attn2), SD3 or CogVideoX "
                            f"joint attention; {type(denoiser_of(self.pipe)).__name__} has none of them",
                            "use CGCE alone on Flux/Wan pipelines (their joint-attention capture is not implemented)")
        calibrated = pack.hyperparameters.get("denoiser_family", "unet")
        if calibrated != family:
            raise PackError(where, "hyperparameters.denoiser_family", f"pack was calibrated on a {calibrated!r} "
                            f"denoiser but this pipeline's is {family!r} ({type(denoiser_of(self.pipe)).__name__})",
                            "calibrate the IRECE pack on this pipeline (erasekit calibrate --method irece)")

    def _check_irece(self, pack: ConceptPack, where: str) -> None:
        names = irece_attention_processors(self.pipe)
        if not names:
            raise PackError(where, "method", f"IRECE localises with UNet cross-attention (attn2), SD3 or CogVideoX "
                            f"joint attention; {type(denoiser_of(self.pipe)).__name__} has none",
                            "use CGCE alone on Flux/Wan pipelines (their joint-attention capture is not implemented)")
        if "callback_on_step_end" not in inspect.signature(self.pipe.__call__).parameters:
            raise PackError(where, "method", f"{type(self.pipe).__name__} has no callback_on_step_end",
                            "use a pipeline that supports callback_on_step_end")
        sha = pack.hyperparameters.get("denoiser_sha256")
        if sha is not None and sha != denoiser_sha256(self.pipe):
            raise PackError(where, "hyperparameters.denoiser_sha256", "pack was calibrated on another denoiser",
                            "calibrate the IRECE pack on this pipeline")
        layers = pack.hyperparameters["layers"]
        unknown = sorted(set(layers) - set(names))
        if unknown:
            raise PackError(where, "hyperparameters.layers", f"no IRECE attention processor {unknown[0]!r}",
                            f"use names from {names[:3]}...")

    def _irece_concept(self, pack: ConceptPack) -> _IreceConcept:
        hp = pack.hyperparameters
        device = next(denoiser_of(self.pipe).parameters()).device
        probes = {name: pack.tensors[f"probe_weight.{i}"].to(device) for i, name in enumerate(hp["layers"])}
        bias = pack.tensors["probe_bias"].to(device)
        if hp.get("threshold") is None:
            gate = pack.tensors["gate_threshold"].to(device)
        else:  # a probability instead of the calibrated thresholds
            p = min(max(float(hp["threshold"]), 1e-12), 1 - 1e-12)
            gate = torch.full_like(bias, float(torch.logit(torch.tensor(p, dtype=torch.float64))))
        return _IreceConcept(pack.name, probes, bias, gate, frozenset(probes),
                             (float(hp["decide_start"]), float(hp["decide_end"])), float(hp["strength"]),
                             float(hp["start"]), float(hp["end"]), str(hp["cut"]), float(hp["cut_end"]),
                             str(hp["mask"]), int(hp["dilate"]), int(hp["seed"]))

    # -------------------------------------------------------------- attach / detach
    def attach(self) -> DiffusersGuard:
        """Install the hooks (done by the constructor); a second guard on one pipeline is refused."""
        if self._attached:
            return self
        denoiser = denoiser_of(self.pipe)
        registry = HookRegistry.check_if_exists_or_initialize(denoiser)
        if registry.get_hook(HOOK_NAME) is not None:
            raise ErasekitError("guard", "pipe", "this pipeline is already guarded",
                                "detach the other guard first (guard.detach()), or reuse it")
        try:
            registry.register_hook(_ConditioningHook(self), HOOK_NAME)
            self._original_processors: dict[str, Any] | None = None
            if self._irece:
                layers = frozenset().union(*(c.layers for c in self._irece.values()))
                procs = dict(denoiser.attn_processors)
                self._original_processors = dict(procs)
                wrapper = _CAPTURE_PROCESSORS.get(denoiser_family(self.pipe), _CaptureProcessor)
                wrapped = {n: (wrapper(p, n, self) if n in layers else p) for n, p in procs.items()}
                denoiser.set_attn_processor(dict(wrapped))  # it empties the dict it is given
        except BaseException:
            self._remove_hooks()
            raise
        self._attached = True
        return self

    def _remove_hooks(self) -> None:
        denoiser = denoiser_of(self.pipe)
        registry = getattr(denoiser, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is not None:
            registry.remove_hook(HOOK_NAME, recurse=False)
        original = getattr(self, "_original_processors", None)
        if original:
            denoiser.set_attn_processor(dict(original))
        self._original_processors = None

    def detach(self) -> None:
        """Remove every hook and processor this guard installed; the pipeline is as before."""
        with self._lock:
            if self._attached:
                self._remove_hooks()
                self._attached = False

    def __enter__(self) -> DiffusersGuard:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def concepts(self) -> frozenset[str]:
        return self.policy.concepts

    # -------------------------------------------------------------- requests
    def _resolve(self, erase: object, num_prompts: int | None) -> tuple[list[frozenset[str]] | None, frozenset | None]:
        if isinstance(erase, list | tuple) and erase and all(isinstance(e, list | tuple) for e in erase):
            if num_prompts is not None and len(erase) != num_prompts:
                raise ErasekitError("erase", None, f"{len(erase)} per-prompt lists for {num_prompts} prompts",
                                    "pass one list per prompt, or a flat list for all prompts")
            return [self.policy.resolve(list(e), where=f"erase[{i}]") for i, e in enumerate(erase)], None
        resolved = self.policy.resolve(erase, where="erase")
        if num_prompts is None:
            return None, resolved
        return [resolved] * num_prompts, None

    @staticmethod
    def _num_prompts(args: tuple, kwargs: dict) -> int | None:
        prompt = kwargs.get("prompt", args[0] if args else None)
        if isinstance(prompt, str):
            return 1
        if isinstance(prompt, list):
            return len(prompt)
        embeds = kwargs.get("prompt_embeds")
        if isinstance(embeds, torch.Tensor):
            return int(embeds.shape[0])
        return None

    @property
    def _stack(self) -> list[_CallState]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _current(self) -> _CallState | None:
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else None

    @contextlib.contextmanager
    def _push(self, state: _CallState) -> Iterator[_CallState]:
        if not self._attached:
            raise ErasekitError("guard", None, "guard is detached", "call guard.attach() or build a new guard")
        with self._lock:
            self._stack.append(state)
            try:
                yield state
            finally:
                self._stack.pop()
                self.last_report = state.report

    def __call__(self, *args: Any, erase: object = None, **kwargs: Any) -> Any:
        """Run the pipeline with ``erase`` concepts (per call or per prompt) plus the mandatory ones."""
        num_prompts = self._num_prompts(args, kwargs)
        per_prompt, broadcast = self._resolve(erase, num_prompts)
        n_images = kwargs.get("num_images_per_prompt", 1) or 1
        if (kwargs.get("num_videos_per_prompt") or 1) > 1 and per_prompt is not None and len(set(per_prompt)) > 1:
            # Some video pipelines repeat each prompt num_videos_per_prompt times (Wan), others force it
            # to 1 (CogVideoX, AnimateDiff): the rows of one prompt cannot be told apart from here.
            raise ErasekitError("erase", None, "per-prompt erase lists with num_videos_per_prompt > 1: which video "
                                "rows belong to which prompt depends on the pipeline",
                                "pass one erase list for all prompts, or call once per prompt")
        state = _CallState(per_prompt, broadcast, int(n_images) if per_prompt is not None else 1)
        state.call_images = num_prompts * int(n_images) if num_prompts else None
        state.prompt_texts = _prompt_texts(args, kwargs, num_prompts)
        state.encode_kwargs = {k: kwargs[k] for k in _ENCODE_OPTIONS if kwargs.get(k) is not None}
        lora = next((kwargs[k] for k in _ATTENTION_KWARGS if isinstance(kwargs.get(k), dict)), {}).get("scale")
        if lora is not None:  # the pipeline scales text-encoder LoRA layers by it when it encodes
            state.encode_kwargs["lora_scale"] = lora
        with self._push(state):
            if self._irece and state.active() & set(self._irece):
                kwargs = self._with_irece_callback(state, kwargs)
            return self.pipe(*args, **kwargs)

    def erasing(self, erase: object) -> contextlib.AbstractContextManager[_CallState]:
        """Guard DIRECT calls of the pipeline's modules for ``erase`` inside the block.

        A flat list applies to every row; a list of lists gives one list per row of the
        denoiser batch (repeated if the batch is a multiple, e.g. under CFG).
        """
        per_row, broadcast = self._resolve(erase, None)
        return self._push(_CallState(per_row, broadcast, 1))

    # -------------------------------------------------------------- CGCE
    def _condition(self, state: _CallState, embeds: torch.Tensor) -> torch.Tensor:
        active = state.active() & set(self._classifiers)
        if not active:
            return embeds
        # Inference tensors (a call under torch.inference_mode) have no version counter; diffusers
        # never edits prompt embeddings in place (its own caches key on identity), so identity
        # alone is the key there.
        key = (id(embeds), -1 if embeds.is_inference() else embeds._version)
        hit = state.cache.get(key)
        if hit is not None and hit[0] is embeds:
            return hit[1]
        n = embeds.shape[0]
        twins, rows, etas, targets, steps = [], [], [], [], 0
        anchors: list[bool] = []  # per twin: True for a concept's anchor (pushed above its target)
        negatives: list[tuple[torch.Tensor, torch.Tensor]] = []  # (negative embedding [T, D], flagged rows)
        from_refinement: torch.Tensor | None = None  # rows whose uncond gets the refinement's displacement
        anchor_texts: list[tuple[str, str, torch.Tensor]] = []  # (concept, anchor_text, flagged rows)
        for name in sorted(active):
            clf = self._classifiers[name]
            if embeds.ndim != 3 or tuple(embeds.shape[1:]) != (clf.seq_len, clf.embed_dim):
                raise ErasekitError(
                    "encoder_hidden_states (prompt_embeds)", None,
                    f"conditioning of shape {list(embeds.shape)} but the {name!r} classifier reads "
                    f"[N, {clf.seq_len}, {clf.embed_dim}]",
                    "pass prompt_embeds made by this pipeline's encode_prompt, or calibrate on this pipeline")
            try:
                scores = torch.from_numpy(clf.scores(embeds)).to(embeds.device)
            except Exception as exc:  # onnxruntime failures: policy decides (fail closed by default)
                handle_guard_fault(self.policy, self.fault_counts, name, "classifier", exc, logger,
                                   "restore the pack's classifier / onnxruntime", "serving this call without it")
                continue
            flagged = (scores > clf.threshold) & state.rows(name, n, embeds.device)
            state.report.scores[name] = scores.tolist()
            state.report.flagged[name] = torch.nonzero(flagged).flatten().tolist()
            if bool(flagged.any()):
                twins.append(clf.twin.to(embeds.device))
                rows.append(flagged)
                etas.append(clf.eta)
                targets.append(clf.target_logit)
                anchors.append(False)
                if clf.anchor_twin is not None:  # the same rows also move onto the concept's anchor
                    twins.append(clf.anchor_twin.to(embeds.device))
                    rows.append(flagged)
                    etas.append(clf.eta)
                    targets.append(clf.anchor_target_logit)
                    anchors.append(True)
                steps = max(steps, clf.max_steps)
                if clf.negative_embedding is not None:
                    negatives.append((clf.negative_embedding, flagged))
                if clf.negative_from_refinement:
                    from_refinement = flagged if from_refinement is None else from_refinement | flagged
                if clf.anchor_text:
                    anchor_texts.append((name, clf.anchor_text, flagged))
        start = self._anchor_text(state, embeds, anchor_texts) if anchor_texts else embeds
        out, refined = start, False
        if twins:
            result = refine(start, twins, torch.stack(rows), etas=etas, max_steps=steps, target_logits=targets,
                            anchors=anchors if any(anchors) else None)
            out, refined = result.embeds, result.steps > 0
            state.report.refine_steps = max(state.report.refine_steps, result.steps)
        if negatives:
            out = self._negative_guidance(state, out, negatives)
        if from_refinement is not None and refined:  # max_steps=0: nothing removed, nothing to guide by
            out = self._refinement_negative(state, start, out, from_refinement)
        if len(state.cache) >= _CACHE_ENTRIES:  # long erasing() blocks (an attacker's training loop)
            state.cache.pop(next(iter(state.cache)))
        state.cache[key] = (embeds, out)
        return out

    def _anchor_text(self, state: _CallState, embeds: torch.Tensor,
                     anchors: list[tuple[str, str, torch.Tensor]]) -> torch.Tensor:
        """``embeds`` with each flagged conditional row re-encoded as its prompt plus the anchor texts.

        Only rows that map onto the call's text prompts change: the conditional half under CFG, every
        row without it. A row flagged for several anchored concepts gets all their texts, in concept
        order. Unconditional rows (a negative prompt naming the concept) are left to refinement.
        Costs one text-encoder pass over the call's prompts (once per prompt, as the pipeline encodes,
        not once per image), only in calls where a row is flagged for an anchored concept.
        """
        images = state.call_images
        cfg = self._cfg_images(state, embeds)
        if not state.prompt_texts or not images or (cfg is None and embeds.shape[0] != images):
            state.report.anchor_text_skipped = sorted({name for name, _, _ in anchors})
            return embeds  # no text for these rows (prompt_embeds, erasing()) or a batch layout of the caller's
        offset = images if cfg is not None else 0
        texts: dict[int, list[str]] = {}  # image row -> anchor texts
        for name, text, flagged in anchors:
            rows = torch.nonzero(flagged[offset:offset + images]).flatten().tolist()
            for row in rows:
                if text not in texts.setdefault(row, []):
                    texts[row].append(text)
            if rows:
                state.report.anchored[name] = [offset + r for r in rows]
        if not texts:
            return embeds
        prompts = len(next(iter(state.prompt_texts.values())))
        per_prompt = images // prompts
        # One row per prompt: a prompt's images share its erase list and its conditioning, hence its
        # anchor texts. Every prompt is encoded (flagged ones with their anchor texts), so a flagged row's
        # conditioning does not depend on how many neighbours were flagged (matmul results can change with
        # the batch size); only the flagged rows are used. Should a prompt's images ever disagree, each
        # image row is encoded instead.
        by_prompt = [texts.get(p * per_prompt, []) for p in range(prompts)]
        if all(texts.get(r, []) == by_prompt[r // per_prompt] for r in range(images)):
            row_of, row_texts = (lambda r: r // per_prompt), by_prompt
            fields = state.prompt_texts
        else:
            row_of, row_texts = (lambda r: r), [texts.get(r, []) for r in range(images)]
            fields = {key: [t for t in values for _ in range(per_prompt)] for key, values in state.prompt_texts.items()}
        encoded = self._encode_prompts(state, {key: [_append(p, row_texts[i]) for i, p in enumerate(values)]
                                               for key, values in fields.items()}, embeds)
        rows = sorted(texts)
        out = embeds.clone()
        out[torch.tensor(rows, device=embeds.device) + offset] = encoded[[row_of(r) for r in rows]]
        return out

    def _encode_prompts(self, state: _CallState, fields: dict[str, list[str]], like: torch.Tensor) -> torch.Tensor:
        """The pipeline's own conditioning for ``fields`` (``prompt``, ``prompt_2``, ...), one row each, no CFG."""
        encode = getattr(self.pipe, "encode_prompt", None)
        if encode is None:
            raise ErasekitError("anchor_text", None, f"{type(self.pipe).__name__} has no encode_prompt to "
                                "re-encode flagged prompts with", "drop anchor_text from the CGCE pack for this pipeline")
        params = inspect.signature(encode).parameters
        kwargs: dict[str, Any] = {k: v for k, v in fields.items() if k in params}
        for key in ("prompt_2", "prompt_3"):  # some pipelines require them; None = "same as prompt"
            if key in params and key not in kwargs:
                kwargs[key] = None
        optional = {"device": like.device, "num_images_per_prompt": 1, "num_videos_per_prompt": 1,
                    "do_classifier_free_guidance": False, **state.encode_kwargs}
        kwargs.update({k: v for k, v in optional.items() if k in params})
        with torch.no_grad(), self._reencode_precision(like.device):
            result = encode(**kwargs)
        encoded = result[0] if isinstance(result, tuple) else result
        if tuple(encoded.shape[1:]) != tuple(like.shape[1:]):
            raise ErasekitError("anchor_text", None, f"re-encoded prompts have shape {list(encoded.shape)} but the "
                                f"pipeline conditions on {list(like.shape)}",
                                "call the pipeline with prompt= and its default encoding options, or drop anchor_text")
        return encoded.to(like.device, like.dtype)

    @contextlib.contextmanager
    def _reencode_precision(self, device: torch.device) -> Iterator[None]:
        """Autocast to ``anchor_text_dtype`` for the re-encoding, or nothing (the pipeline's own precision).
        The text encoders' float32 linear weights are cast once and kept (:class:`CastWeights`)."""
        if self._cast_weights is None:
            yield
            return
        encoders = [m for name, m in self.pipe.components.items()
                    if name.startswith("text_encoder") and isinstance(m, torch.nn.Module)]
        with self._cast_weights.swapped(encoders), torch.autocast(device_type=device.type, dtype=self._cast_weights.dtype):
            yield

    def _cfg_images(self, state: _CallState, out: torch.Tensor) -> int | None:
        """Images of a pipeline call whose conditioning ``out`` is CFG's ``[uncond, cond]`` batch, else None
        (guidance scale <= 1, or an ``erasing()`` block, where the batch layout is the caller's)."""
        images = state.call_images
        if not images or out.shape[0] != 2 * images:
            return None
        cfg = getattr(self.pipe, "do_classifier_free_guidance", None)
        if cfg is None:  # CogVideoX decides CFG in a local variable: guidance_scale > 1, as there
            cfg = float(getattr(self.pipe, "_guidance_scale", None) or 0.0) > 1.0
        return images if cfg else None

    def _negative_guidance(self, state: _CallState, out: torch.Tensor,
                           negatives: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Flagged conditional rows get their concept's negative embedding as their unconditional row.

        Only in a pipeline call running classifier-free guidance (``[uncond, cond]`` batch of twice
        the images); without CFG (guidance scale <= 1) or in ``erasing()`` blocks this is a no-op.
        Replaces the uncond row whatever it was (the empty prompt or the caller's negative prompt /
        ``negative_prompt_embeds``): for a flagged row, steering away from the concept wins. A row
        flagged for several concepts gets the mean of their negative embeddings: no concept is
        dropped, and the result does not depend on pack order. Other rows are the same values.
        """
        images = self._cfg_images(state, out)
        if images is None:
            return out
        uncond, replaced = negative_unconditional(out[:images], [(neg, flagged[images:]) for neg, flagged in negatives])
        if not bool(replaced.any()):
            return out
        state.report.negative_guided = torch.nonzero(replaced).flatten().tolist()
        return torch.cat([uncond, out[images:]])

    def _refinement_negative(self, state: _CallState, embeds: torch.Tensor, out: torch.Tensor,
                             flagged: torch.Tensor) -> torch.Tensor:
        """Flagged conditional rows' unconditional row moves by what refinement removed: ``u + (E - E')``.

        Classifier-free guidance then extrapolates away from exactly the displacement the
        classifier attributes to the concept, while the conditional and unconditional rows share
        the rest of the prompt (a negative *text* differs from the empty prompt in more than the
        concept). Same conditions as :meth:`_negative_guidance`: a no-op without CFG and in
        ``erasing()`` blocks. Added after a text negative if a row has both. ``E - E'`` is the row's
        whole refinement -- every concept refined on it, anchors included -- since one refinement
        moves the row for all of them at once. Other rows keep their values.
        """
        images = self._cfg_images(state, out)
        if images is None:
            return out
        cond = flagged[images:]
        if not bool(cond.any()):
            return out
        uncond = refined_unconditional(out[:images], embeds[images:], out[images:], cond)
        state.report.negative_guided = sorted(set(state.report.negative_guided)
                                              | set(torch.nonzero(cond).flatten().tolist()))
        return torch.cat([uncond, out[images:]])

    # -------------------------------------------------------------- IRECE
    def _num_steps(self, state: _CallState) -> int:
        return int(state.num_steps or getattr(self.pipe, "_num_timesteps", None) or 0)

    def _irece_names(self, state: _CallState) -> tuple[str, ...]:
        """The call's active IRECE concepts, sorted; computed once per call (they do not change)."""
        if state.irece_names is None:
            state.irece_names = tuple(sorted(state.active() & set(self._irece)))
        return state.irece_names

    def _irece_plan(self, state: _CallState) -> tuple[_PlanEntry, ...]:
        """Per active IRECE concept, for this step: score positions? cut the text at the mask? which probe row?

        Built once per step (every wrapped layer of the step reads it). ``state.latched`` only
        ever holds masks with an image latched, so membership is the "any latched" test: no
        device-to-host read here.
        """
        plan = state.plan
        if plan is not None and plan[0] == state.step:
            return plan[1]
        entries: list[_PlanEntry] = []
        num = self._num_steps(state)
        if self._irece and num:
            for name in self._irece_names(state):
                c = self._irece[name]
                any_latched = name in state.latched
                deciding = irece_math.in_window(state.step, num, *c.decide)
                cut = any_latched and c.cut != "none" and state.step < c.cut_end * num and name in state.masks
                renoise = any_latched and c.strength > 0 and irece_math.in_window(state.step, num, c.start, c.end)
                score = deciding or (any_latched and c.mask_mode == "above_mean" and (cut or renoise))
                if score or cut:
                    t = irece_math.calibration_step(state.step, num, len(c.bias_rows))
                    entries.append(_PlanEntry(c, score, cut, t))
        state.plan = (state.step, tuple(entries))
        return state.plan[1]

    def _images(self, state: _CallState) -> int:
        return len(state.per_prompt or ()) * state.images_per_prompt

    def _capture(self, state: _CallState, entry: _PlanEntry, name: str, attn: Any, hidden: torch.Tensor) -> None:
        """Per-position concept logits of this layer (bias excluded) with the folded per-step probe.

        Runs for every wrapped layer of every decision step, so it does only the arithmetic: the
        probe row (a cached view) comes from the step's plan, and grad mode is switched off only
        where it is on (pipeline calls already run without grad; entering ``no_grad`` anyway
        measured ~6 us per layer on the world pipeline, a third of this function).
        """
        if torch.is_grad_enabled():  # erasing() blocks around a training loop
            with torch.no_grad():
                self._capture(state, entry, name, attn, hidden)
            return
        h = cross_attention_inputs(attn, hidden, self._images(state))
        weight, shift = entry.concept.fold_at(name, attn, entry.t)
        state.maps.setdefault(entry.concept.name, []).append(h.float() @ weight + shift)

    def _cut(self, state: _CallState, concept: _IreceConcept, out: torch.Tensor) -> torch.Tensor:
        images = self._images(state)
        mask = state.masks.get(concept.name)
        if mask is None or out.ndim != 3 or out.shape[0] != 2 * images or mask.shape[0] != images:
            return out  # no unconditional branch (guidance 1): the latent perturbation acts alone
        if mask.ndim == 5:
            return irece_math.cut_video_tokens(out, mask, images, self._patch_t)
        return irece_math.cut_image_tokens(out, mask, images)

    def _with_irece_callback(self, state: _CallState, kwargs: dict) -> dict:
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        user = kwargs.get("callback_on_step_end")
        inputs = list(kwargs.get("callback_on_step_end_tensor_inputs") or ["latents"])
        if isinstance(user, PipelineCallback | MultiPipelineCallbacks):
            inputs = list(user.tensor_inputs)
        if "latents" not in inputs:
            inputs.append("latents")

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            out = dict(user(pipe, step, timestep, tensors) or {}) if user is not None else {}
            latents = out.get("latents", tensors["latents"])
            new = self._irece_step(state, step, latents)
            if new is not latents:
                out["latents"] = new
            return out

        return {**kwargs, "callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": inputs}

    def _irece_gate(self, state: _CallState, c: _IreceConcept, step: int, num: int, captured: list[torch.Tensor],
                    latched: torch.Tensor | None, b: int, device: torch.device) -> torch.Tensor | None:
        """A decision step: images whose logit clears the gate latch; the latched mask, or None if none is.

        The image logit is only needed here (outside the decision window nothing latches). The
        margins are read to the host once for the report, and that list decides whether anything
        latches (an fp32 value compares to 0 exactly as a Python float): on a benign step no
        further device op runs (measured ~8 us each on the world pipeline, four of them per step).
        """
        t = irece_math.calibration_step(step, num, len(c.bias_rows))
        margin = irece_math.gate_margin(captured, c.bias_rows[t], c.gate_rows[t])
        margins = margin.tolist()
        state.report.irece_gate.setdefault(c.name, []).append(margins)
        flags = state.row_flags(c.name, b)
        if latched is None and len(margins) == b and not any(m > 0 and r for m, r in zip(margins, flags, strict=True)):
            return None  # the benign step: nothing latched before, nothing latches now
        new = (margin > 0) & state.rows(c.name, b, device)
        latched = new if latched is None else latched | new
        if not bool(latched.any()):
            return None
        state.latched[c.name] = latched
        state.report.irece_latched[c.name] = torch.nonzero(latched).flatten().tolist()
        return latched

    def _irece_step(self, state: _CallState, step: int, latents: torch.Tensor) -> torch.Tensor:
        num = self._num_steps(state)
        maps, state.maps = state.maps, {}
        state.step, state.plan = step + 1, None
        out = latents
        if latents.ndim != (5 if self._video else 4) or not num or not (maps or state.latched):
            return out  # nothing scored, nothing latched: the common benign step costs nothing more
        b = latents.shape[0]
        for name in self._irece_names(state):
            c = self._irece[name]
            # under CFG the batch is [uncond, cond]; the capture already keeps cond rows only
            captured = [m if m.shape[0] <= b else m[-b:] for m in maps.get(name, ())]
            latched = state.latched.get(name)  # only ever holds masks with an image latched
            if not captured and latched is None:
                continue
            if captured and irece_math.in_window(step, num, *c.decide):
                latched = self._irece_gate(state, c, step, num, captured, latched, b, latents.device)
            if latched is None:
                continue
            logits = None
            if captured and c.mask_mode == "above_mean":
                if self._video:  # [B, F, C, H, W]: the token grid is (F/pt, H/p, W/p)
                    size = (latents.shape[1], *latents.shape[-2:])
                    logits = irece_math.video_maps_to_latent(captured, size, self._patch_t) * len(captured)
                else:
                    logits = irece_math.maps_to_latent(captured, tuple(latents.shape[-2:]), self._upsample) * len(captured)
            build = irece_math.build_video_mask if self._video else irece_math.build_mask
            if c.mask_mode == "image":
                mask = build(latents[:, :, 0] if self._video else latents[:, 0], latched, 0, "image")
            elif logits is not None:
                mask = build(logits, latched, c.dilate)
            else:
                mask = state.masks.get(name)
                if mask is None:
                    continue
            state.masks[name] = mask
            if c.strength > 0 and irece_math.in_window(step, num, c.start, c.end):
                state.report.irece_masked_fraction.setdefault(name, []).append(float(mask.float().mean()))
                gen = torch.Generator(device="cpu").manual_seed(c.seed + 1000003 * step)
                out = irece_math.perturb_latents(out, mask, c.strength, gen)
        return out


def guard(
    pipe: DiffusionPipeline,
    packs: Sequence[ConceptPack | str | Path] | None = (),
    policy: Policy | str | Path | None = None,
    mandatory: Sequence[str] = (),
    anchor_text_dtype: torch.dtype | str | None = None,
) -> DiffusersGuard:
    """Guard ``pipe`` with ``packs``; ``policy`` may be a :class:`Policy` or a YAML/JSON file.
    ``anchor_text_dtype``: see :class:`DiffusersGuard`."""
    if isinstance(policy, str | Path):
        policy = Policy.from_file(policy)
    return DiffusersGuard(pipe, packs=packs or (), policy=policy, mandatory=mandatory,
                          anchor_text_dtype=anchor_text_dtype)
