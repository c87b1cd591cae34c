"""Calibrate CGCE and IRECE packs on a diffusers pipeline (``erasekit calibrate --method cgce|irece``).

Embeddings are read where the guard reads them: at the denoiser's ``encoder_hidden_states``.
:func:`encode_conditioning` runs the pipeline itself up to the first denoiser call and stops,
so whatever the pipeline does to build its conditioning (SDXL's two penultimate layers, clip
skip, T5 padding, prompt weighting in a subclass) is calibrated on exactly as it is served.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import HookRegistry, ModelHook
from tqdm.auto import tqdm

from erasekit.classifiers import cgce
from erasekit.classifiers.detector import fit_detector
from erasekit.classifiers.onnx_export import export_detector
from erasekit.errors import ErasekitError
from erasekit.guardrails.cli_inputs import (
    concept_from_args,
    parse_call_settings,
    parse_overrides,
    read_prompt_file,
)
from erasekit.guardrails.concept import Concept
from erasekit.guardrails.pack import ConceptPack
from erasekit.guardrails.pairs import distinctive_subwords, subphrase_prompts
from erasekit.integrations.diffusers import (
    conditioning_dim,
    cross_attention_queries,
    denoiser_family,
    denoiser_of,
    denoiser_sha256,
    fingerprint_pipeline,
    irece_attention_processors,
)
from erasekit.steering import irece

_CAPTURE_HOOK = "erasekit_calibration_capture"


class _Captured(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, embeds: torch.Tensor) -> None:
        super().__init__("captured")
        self.embeds = embeds


class _StopAtDenoiser(ModelHook):
    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        embeds = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        raise _Captured(embeds.detach())


def encode_conditioning(
    pipe: DiffusionPipeline, prompts: Sequence[str], batch_size: int = 32, progress: bool = False, **call_kwargs: Any
) -> torch.Tensor:
    """The denoiser's conditioning ``[N, T, D]`` (float32, CPU) for each prompt, without CFG rows."""
    registry = HookRegistry.check_if_exists_or_initialize(denoiser_of(pipe))
    registry.register_hook(_StopAtDenoiser(), _CAPTURE_HOOK)
    out: list[torch.Tensor] = []
    kwargs = {"num_inference_steps": 1, "output_type": "latent", "guidance_scale": 1.0, **call_kwargs}
    try:
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc="encoding prompts", disable=not progress):
            batch = list(prompts[start:start + batch_size])
            try:
                with torch.no_grad():
                    pipe(prompt=batch, **kwargs)
            except _Captured as cap:
                out.append(cap.embeds[-len(batch):].float().cpu())  # under CFG the batch is [uncond, cond]
            else:
                raise ErasekitError(type(pipe).__name__, "denoiser", "pipeline finished without calling its denoiser",
                                    "calibrate on a text-to-image/video pipeline")
    finally:
        registry.remove_hook(_CAPTURE_HOOK, recurse=False)
    return torch.cat(out)


def _tokenizer(pipe: DiffusionPipeline) -> Any:
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        if tok is not None:
            return tok
    raise ErasekitError(type(pipe).__name__, "tokenizer", "pipeline has no tokenizer", "pass a text-conditioned pipeline")


def _phrase_rows(pipe: DiffusionPipeline, phrases: Sequence[str], field: str = "keywords",
                 **call_kwargs: Any) -> list[torch.Tensor]:
    """Per phrase, encoded alone, its word rows of the conditioning (special tokens dropped: BOS/EOS/
    padding carry the whole prompt, not the words)."""
    tok = _tokenizer(pipe)
    embeds = encode_conditioning(pipe, list(phrases), **call_kwargs)
    special = set(tok.all_special_ids)
    rows = []
    for phrase, e in zip(phrases, embeds, strict=True):
        ids = tok(phrase).input_ids
        positions = [i for i, t in enumerate(ids) if t not in special and i < e.shape[0]]
        if not positions:
            raise ErasekitError("concept", field, f"phrase {phrase!r} has no non-special tokens",
                                f"use real words in the concept's {field}")
        rows.append(e[positions])
    return rows


def concept_embedding(pipe: DiffusionPipeline, phrases: Sequence[str], **call_kwargs: Any) -> torch.Tensor:
    """The conditioning rows ``[K, D]`` of the concept's own words, each phrase encoded alone."""
    return torch.cat(_phrase_rows(pipe, phrases, **call_kwargs))


def phrase_vectors(pipe: DiffusionPipeline, phrases: Sequence[str], **call_kwargs: Any) -> np.ndarray:
    """One unit vector per phrase: the mean of its word rows under the pipeline's own encoder."""
    means = torch.stack([r.float().mean(0) for r in _phrase_rows(pipe, phrases, "subphrases", **call_kwargs)])
    return torch.nn.functional.normalize(means, dim=1).numpy()


def with_subphrases(pipe: DiffusionPipeline, concept: Concept, phrases: Sequence[str], seed: int = 0,
                    **call_kwargs: Any) -> Concept:
    """``concept`` with extra forget prompts in which a multi-word phrasing is cut to one distinctive
    word (:func:`~erasekit.guardrails.pairs.distinctive_subwords`, judged by this pipeline's encoder);
    the words used are kept in ``metadata["subphrases"]``."""
    subwords = distinctive_subwords(list(phrases), list(concept.retain),
                                    embed=lambda texts: phrase_vectors(pipe, texts, **call_kwargs))
    extra = subphrase_prompts(concept.forget, subwords, seed)
    return dataclasses.replace(concept, forget=(*concept.forget, *extra),
                               metadata={**concept.metadata, "subphrases": subwords})


def _phrases(concept: Concept) -> list[str]:
    return list(concept.keywords) or [concept.name.replace("_", " ").replace("-", " ")]


def negative_prompt_of(concept: Concept) -> str:
    """The text CGCE negative guidance encodes for ``concept``: its keywords (or name), comma-joined."""
    return ", ".join(_phrases(concept))


def _negative_encoding(pipe: DiffusionPipeline, concept: Concept, negative_prompt: str | None,
                       encode_kwargs: dict[str, Any]) -> tuple[str, torch.Tensor]:
    """The negative-guidance text (``negative_prompt``, default :func:`negative_prompt_of`) and its
    conditioning ``[T, D]`` under the pipeline's own encoder."""
    text = negative_prompt if negative_prompt is not None else negative_prompt_of(concept)
    return text, encode_conditioning(pipe, [text], **encode_kwargs)[0].contiguous()


def add_negative_embedding(pipe: DiffusionPipeline, pack: ConceptPack, negative_prompt: str | None = None,
                           **encode_kwargs: Any) -> ConceptPack:
    """``pack`` (cgce) with ``tensors.negative_embedding``: the pipeline's conditioning ``[T, D]`` of the
    concept's text (``negative_prompt``, default :func:`negative_prompt_of`), the unconditional row
    negative guidance puts under flagged rows. Packs written before the tensor existed get it here
    without re-fitting the classifier; ``negative_guidance`` is left as it is.
    """
    text, negative = _negative_encoding(pipe, pack.concept, negative_prompt, encode_kwargs)
    pack = dataclasses.replace(pack, tensors={**pack.tensors, "negative_embedding": negative},
                               hyperparameters={**pack.hyperparameters, "negative_prompt": text}, source=None)
    pack.validate()
    return pack


def _apply_overrides(hp: dict[str, Any], overrides: dict[str, Any], method: str,
                     optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """``hp`` with ``overrides``; ``optional`` names keys accepted although ``hp`` has no default for them."""
    known = {*hp, *optional}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ErasekitError("--set", unknown[0], f"unknown {method} hyperparameter", f"use one of {sorted(known)}")
    return {**hp, **overrides}


def calibrate_cgce(
    pipe: DiffusionPipeline,
    concept: Concept,
    *,
    C: float | None = None,
    batch_size: int = 32,
    progress: bool = False,
    encode_kwargs: dict[str, Any] | None = None,
    negative_prompt: str | None = None,
    anchor: Concept | None = None,
    subphrases: Sequence[str] | None = None,
    **hyperparameters: Any,
) -> ConceptPack:
    """Fit a CGCE classifier on ``concept.forget`` (unsafe) vs ``concept.retain`` (safe) prompts.

    The pack also stores ``negative_embedding``, the conditioning of ``negative_prompt`` (default: the
    concept's keywords, :func:`negative_prompt_of`), used when ``negative_guidance`` is on.

    ``anchor``: optional neutral concept flagged rows are steered *towards* (see ``anchor`` in
    :mod:`erasekit.classifiers.cgce`): a second detector is fitted with ``anchor.forget`` (the
    anchor prompts) = 1 against ``concept.forget`` plus the anchor's negatives = 0, attending with
    ``anchor.keywords`` (or its name). The negatives are ``anchor.retain`` when given, else
    ``concept.retain`` minus the anchor prompts. Give ``anchor.retain`` when the concept's retain
    prompts may name the anchor in other words (the world's retain prompts say "solid", "uniformly
    coloured"): labelled 0, they would teach the anchor detector that the anchor is absent.
    Its twin goes into the pack (``anchor_*`` tensors, ``anchor=1``), and its target is its mean
    training logit on the anchor prompts: refinement pulls a flagged row as far onto the anchor as
    the typical anchor prompt sits.

    ``subphrases``: the concept's phrasings (e.g. its synonyms); the forget prompts that use a
    multi-word one are added once more with it cut to one distinctive word (:func:`with_subphrases`),
    so the detector learns the parts paraphrases reuse. The pack's concept keeps the extra prompts
    and ``metadata["subphrases"]``.

    ``encode_kwargs`` go to the pipeline call that encodes prompts (e.g. ``max_sequence_length``):
    they must match how the pipeline will be called, since the classifier reads that shape.
    """
    if len(concept.forget) < 2 or len(concept.retain) < 2:
        raise ErasekitError("Concept", "forget/retain", "CGCE needs at least 2 prompts with and 2 without the concept",
                            "pass a few hundred of each (pairs that differ only by the concept work best)")
    hp = _apply_overrides(dict(cgce.DEFAULTS), hyperparameters, "cgce", cgce.OPTIONAL_HYPERPARAMETERS)
    encode_kwargs = encode_kwargs or {}
    if subphrases:
        concept = with_subphrases(pipe, concept, subphrases, **encode_kwargs)
    unsafe = encode_conditioning(pipe, concept.forget, batch_size, progress, **encode_kwargs)
    safe = encode_conditioning(pipe, concept.retain, batch_size, progress, **encode_kwargs)
    phrases = concept_embedding(pipe, _phrases(concept), **encode_kwargs)
    detector = fit_detector(unsafe.numpy(), safe.numpy(), phrases.numpy(), tau=float(hp["tau"]), C=C,
                            flat=bool(hp["flat"]))
    head = _detection_head(pipe, concept, unsafe, safe, hp, C, encode_kwargs) \
        if any(k in hyperparameters for k in cgce.DETECT_HYPERPARAMETERS) else detector
    z = detector.decision_function(np.concatenate([unsafe, safe]).reshape(len(unsafe) + len(safe), -1))
    y = np.r_[np.ones(len(unsafe)), np.zeros(len(safe))]
    probs = 1 / (1 + np.exp(-z))
    # Class-mean training logits: the scale the refinement's safety margin is measured in.
    hp.update(seq_len=int(unsafe.shape[1]), embed_dim=int(unsafe.shape[2]), C=float(detector.steps[-1][1].C),
              train_accuracy=float(((probs > hp["threshold"]) == y).mean()),
              safe_logit=float(z[y == 0].mean()), unsafe_logit=float(z[y == 1].mean()))
    hp["negative_prompt"], negative = _negative_encoding(pipe, concept, negative_prompt, encode_kwargs)
    tensors = {**cgce.pack_tensors_from_detector(detector), "negative_embedding": negative}
    if anchor is not None:
        tensors.update(_anchor_twin(pipe, concept, anchor, unsafe, safe, hp, C, batch_size, progress, encode_kwargs))
    return ConceptPack(
        concept=concept, method="cgce", fingerprint=fingerprint_pipeline(pipe),
        tensors=tensors, hyperparameters=hp,
        classifier_onnx=export_detector(head),
    )


def _detection_head(pipe: DiffusionPipeline, concept: Concept, unsafe: torch.Tensor, safe: torch.Tensor,
                    hp: dict[str, Any], C: float | None, encode_kwargs: dict[str, Any]) -> Any:
    """The pack's separate detection head (``detect_*`` in :mod:`erasekit.classifiers.cgce`), fitted on the
    same prompts plus the empty prompt as a negative; writes its settings and statistics into ``hp``.

    Why the empty prompt: it is the unconditional row CFG pairs with every call, and the guard scores
    that row too. Without the flat block, nothing ties the head to it: on a tiny CogVideoX (random T5)
    the head flagged ``""`` as the concept (tests/test_diffusers_pipelines.py), which would refine the
    unconditional row of benign prompts in the same call.
    """
    for key, value in cgce.DETECT_DEFAULTS.items():
        hp.setdefault(key, value)
    hp.setdefault("detect_phrases", _phrases(concept))
    cgce.validate_detection_head(hp, "calibrate_cgce")
    phrases = concept_embedding(pipe, list(hp["detect_phrases"]), **encode_kwargs)
    empty = encode_conditioning(pipe, [""], **encode_kwargs)
    safe = torch.cat([safe, empty.expand(max(1, len(safe) // 20), -1, -1)])
    head = fit_detector(unsafe.numpy(), safe.numpy(), phrases.numpy(), tau=float(hp["detect_tau"]), C=C,
                        flat=bool(hp["detect_flat"]))
    x = np.concatenate([unsafe, safe]).reshape(len(unsafe) + len(safe), -1)
    y = np.r_[np.ones(len(unsafe)), np.zeros(len(safe))]
    hp.update(detect_C=float(head.steps[-1][1].C),
              detect_train_accuracy=float(((head.predict_proba(x)[:, 1] > hp["threshold"]) == y).mean()))
    return head


def _anchor_twin(pipe: DiffusionPipeline, concept: Concept, anchor: Concept, unsafe: torch.Tensor,
                 safe: torch.Tensor, hp: dict[str, Any], C: float | None, batch_size: int, progress: bool,
                 encode_kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The anchor detector's pack tensors; writes ``anchor``, ``anchor_target_logit`` and its statistics into ``hp``."""
    if len(anchor.forget) < 2:
        raise ErasekitError("anchor", "forget", "the anchor needs at least 2 anchor prompts (in its forget list)",
                            "pass a few hundred prompts that show the anchor")
    anchor_prompts = set(anchor.forget)
    if anchor.retain:
        others = encode_conditioning(pipe, anchor.retain, batch_size, progress, **encode_kwargs)
    else:
        keep = [i for i, r in enumerate(concept.retain) if r not in anchor_prompts]
        others = safe[keep]
    positives = encode_conditioning(pipe, anchor.forget, batch_size, progress, **encode_kwargs)
    negatives = torch.cat([unsafe, others])
    phrases = concept_embedding(pipe, _phrases(anchor), **encode_kwargs)
    detector = fit_detector(positives.numpy(), negatives.numpy(), phrases.numpy(), tau=float(hp["tau"]), C=C,
                            flat=bool(hp["flat"]))
    z_pos = detector.decision_function(positives.reshape(len(positives), -1).numpy())
    z_neg = detector.decision_function(negatives.reshape(len(negatives), -1).numpy())
    hp.update(anchor=1, anchor_target_logit=float(z_pos.mean()), anchor_negative_logit=float(z_neg.mean()),
              anchor_train_accuracy=float(((z_pos > 0).sum() + (z_neg <= 0).sum()) / (len(z_pos) + len(z_neg))),
              anchor_C=float(detector.steps[-1][1].C),
              anchor_prompt=f"{anchor.name}: {len(anchor.forget)} prompts, e.g. {anchor.forget[0]!r}")
    return cgce.pack_tensors_from_detector(detector, prefix="anchor_")


class _QueryRecorder:
    """Temporary cross-attention processor: original output, plus the mean query per image and step."""

    def __init__(self, inner: Any, name: str, sink: dict[str, list[torch.Tensor]], images: int) -> None:
        self.inner, self.name, self.sink, self.images = inner, name, sink, images

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is not None:
            with torch.no_grad():
                query = cross_attention_queries(attn, hidden_states, self.images)
            self.sink.setdefault(self.name, []).append(query.float().mean(dim=1).cpu())
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


class _VideoQueryRecorder(_QueryRecorder):
    """CogVideoX ``attn1``: records ``to_q`` of the video tokens (before ``norm_q`` and the rotary
    embedding, as the guard's ``_VideoCaptureProcessor`` reads them) and forwards the rotary
    embedding by name -- Attention.forward drops keyword arguments its processor does not name."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None,
                 **kwargs: Any) -> Any:
        if encoder_hidden_states is not None:
            with torch.no_grad():
                query = cross_attention_queries(attn, hidden_states, self.images)
            self.sink.setdefault(self.name, []).append(query.float().mean(dim=1).cpu())
        extra = {"image_rotary_emb": image_rotary_emb} if image_rotary_emb is not None else {}
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **extra, **kwargs)


def record_queries(
    pipe: DiffusionPipeline, prompts: Sequence[str], layers: Sequence[str], fit_until: float, batch_size: int = 16,
    progress: bool = False, seed: int = 0, **call_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Mean cross-attention query per (prompt, step) for the first ``fit_until`` of the schedule.

    Returns ``{layer: [len(prompts) * steps, C]}``, rows ordered prompt-major within each batch.
    """
    denoiser = denoiser_of(pipe)
    original = dict(denoiser.attn_processors)
    steps = int(call_kwargs.get("num_inference_steps", 20))
    keep = max(1, int(round(fit_until * steps)))
    out: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    recorder = _VideoQueryRecorder if denoiser_family(pipe) == "cogvideox" else _QueryRecorder
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="recording queries", disable=not progress):
            batch = list(prompts[start:start + batch_size])
            sink: dict[str, list[torch.Tensor]] = {}
            procs = {n: (recorder(p, n, sink, len(batch)) if n in layers else p) for n, p in original.items()}
            denoiser.set_attn_processor(dict(procs))
            with torch.no_grad():
                pipe(prompt=batch, output_type="latent", generator=torch.Generator().manual_seed(seed + start),
                     **{"num_inference_steps": steps, **call_kwargs})
            for n in layers:
                calls = sink.get(n, [])[:keep]  # one entry per denoiser call = per step
                out[n].append(torch.stack(calls, dim=1).flatten(0, 1))  # [B * keep, C]
    finally:
        denoiser.set_attn_processor(dict(original))
    return {n: torch.cat(v) for n, v in out.items()}


def calibrate_irece(
    pipe: DiffusionPipeline,
    concept: Concept,
    *,
    n_prompts: int = 48,
    n_holdout: int | None = None,
    call_kwargs: dict[str, Any] | None = None,
    C: float = 1.0,
    progress: bool = False,
    **hyperparameters: Any,
) -> ConceptPack:
    """An IRECE pack: per-step concept probes on cross-attention queries, a calibrated gate, settings.

    The pipeline draws ``n_prompts`` forget prompts (label 1) and retain prompts (label 0) with
    ``call_kwargs`` (use the settings it will be served with); at every step, the layers' mean
    queries per image (concatenated) train one logistic probe. Then ``n_holdout`` (default
    ``2 * n_prompts``) further retain generations -- other prompts, other seeds -- set the gate's
    per-step thresholds so that at most ``gate_fpr`` of them would be latched.
    """
    hp = _apply_overrides(dict(irece.DEFAULTS), hyperparameters, "irece")
    names = irece_attention_processors(pipe)  # UNet attn2, or SD3/CogVideoX joint attention (image/video queries)
    if not names:
        raise ErasekitError(type(pipe).__name__, "method", "IRECE needs UNet cross-attention (attn2) or SD3/CogVideoX "
                            "joint attention layers", "use CGCE alone on Flux/Wan pipelines")
    layers = names if hp["layers"] == "all" else list(hp["layers"])
    unknown = sorted(set(layers) - set(names))
    if unknown:
        raise ErasekitError("calibrate_irece", "layers", f"no IRECE attention processor {unknown[0]!r}",
                            f"use names from {names[:3]}...")
    if len(concept.forget) < 2 or len(concept.retain) < 2:
        raise ErasekitError("Concept", "forget/retain", "IRECE needs at least 2 prompts with and 2 without the concept",
                            "pass a few dozen of each")
    n_holdout = 2 * n_prompts if n_holdout is None else n_holdout
    forget, retain = list(concept.forget[:n_prompts]), list(concept.retain[:n_prompts])
    held = list(concept.retain[n_prompts:n_prompts + n_holdout]) or retain  # other prompts where there are any
    kwargs = dict(call_kwargs or {})

    def features(prompts: list[str], seed: int) -> np.ndarray:
        rec = record_queries(pipe, prompts, layers, 1.0, progress=progress, seed=seed, **kwargs)
        return torch.cat([rec[n].view(len(prompts), -1, rec[n].shape[-1]) for n in layers], -1).numpy()

    pos, neg = features(forget, 0), features(retain, 0)
    held_neg = features(held, 1_000_003)  # other seeds than the fit
    x = np.concatenate([pos, neg])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    weight, bias = irece.fit_step_probes(x, y, C=C)  # [S, L*C], [S]
    steps = weight.shape[0]
    lo = irece.calibration_step(0, 1, steps) if steps == 1 else int(np.floor(hp["decide_start"] * steps))
    hi = max(lo + 1, int(np.ceil(hp["decide_end"] * steps)))
    held_logits = np.einsum("nsf,sf->ns", held_neg, weight) + bias
    thresholds = irece.gate_thresholds(held_logits, float(hp["gate_fpr"]), lo, hi)
    train_logits = np.einsum("nsf,sf->ns", x, weight) + bias
    widths = [int(pos.shape[-1] // len(layers))] * len(layers)
    tensors: dict[str, torch.Tensor] = {"probe_bias": torch.tensor(bias), "gate_threshold": torch.tensor(thresholds)}
    for i, w in enumerate(np.split(weight, np.cumsum(widths)[:-1], axis=1)):
        tensors[f"probe_weight.{i}"] = torch.tensor(np.ascontiguousarray(w), dtype=torch.float32)
    embed_dim = conditioning_dim(pipe) or int(encode_conditioning(pipe, [concept.name], **kwargs).shape[-1])
    latched_train = (train_logits[:, lo:hi] > thresholds[lo:hi]).any(1)
    hp.update(layers=layers, embed_dim=int(embed_dim), denoiser_sha256=denoiser_sha256(pipe),
              denoiser_family=denoiser_family(pipe),
              probe_train_accuracy=round(float(((train_logits > 0) == y[:, None]).mean()), 4),
              gate_train_tpr=round(float(latched_train[y == 1].mean()), 4),
              gate_train_fpr=round(float(latched_train[y == 0].mean()), 4),
              gate_holdout_negatives=len(held))
    return ConceptPack(concept=concept, method="irece", fingerprint=fingerprint_pipeline(pipe),
                       tensors=tensors, hyperparameters=hp)


def calibrate(pipe: DiffusionPipeline, concept: Concept, method: str = "cgce", **kwargs: Any) -> ConceptPack:
    """``erasekit.calibrate`` for diffusers pipelines: ``method`` is ``"cgce"`` (default) or ``"irece"``."""
    if method == "cgce":
        return calibrate_cgce(pipe, concept, **kwargs)
    if method == "irece":
        return calibrate_irece(pipe, concept, **kwargs)
    raise ErasekitError("calibrate", "method", f"{method!r} is not a diffusion method", "use 'cgce' or 'irece'")


#: Pipeline ``__call__`` arguments calibration sets itself (prompts, batch layout, outputs, seeds):
#: ``--call`` may not override them.
RESERVED_CALL_KEYS = frozenset({
    "prompt", "prompt_2", "prompt_3", "output_type", "return_dict", "generator", "latents",
    "num_images_per_prompt", "num_videos_per_prompt",
})
#: ``--call`` settings CGCE does not pass on: they only steer denoising, and encoding stops at the
#: first denoiser call (one step, no CFG rows) -- the conditioning CGCE reads does not depend on them.
CGCE_UNUSED_CALL_KEYS = frozenset({"num_inference_steps", "guidance_scale"})
_SCALAR_TYPES = (bool, int, float, str, type(None))


def _scalar_types(annotation: Any) -> set[type] | None:
    """The JSON scalar types a parameter annotation admits; ``None`` when it cannot be told."""
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, str):
        return None
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        out: set[type] = set()
        for arg in typing.get_args(annotation):
            inner = _scalar_types(arg)
            if inner is None:
                return None
            out |= inner
        return out
    if typing.get_origin(annotation) is typing.Literal:
        return {type(v) for v in typing.get_args(annotation)}
    return {annotation} if annotation in _SCALAR_TYPES else set()  # tensors, lists, callbacks, dicts


def _admits(allowed: set[type], value: Any) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    return type(value) in allowed


def check_call_settings(pipe: DiffusionPipeline, call: dict[str, Any], option: str = "--call") -> dict[str, Any]:
    """Check ``--call`` settings against ``type(pipe).__call__``'s named parameters before any work.

    A typo (``num_frame``) or a wrong type (``num_frames=nine``) would otherwise surface as a
    pipeline error minutes into calibration, or -- worse for a ``**kwargs`` catch-all -- be
    dropped silently and calibrate a pack for settings the pipeline is not served with. Only named
    parameters count (diffusers' ``**kwargs`` holds deprecated callbacks). Returns ``call``.
    """
    params = {n: p for n, p in inspect.signature(type(pipe).__call__).parameters.items()
              if n != "self" and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
    try:
        hints = typing.get_type_hints(type(pipe).__call__)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        hints = {}
    settable: dict[str, set[type] | None] = {}
    for name, param in params.items():
        allowed = _scalar_types(hints.get(name, param.annotation))
        if allowed is None and param.default not in (inspect.Parameter.empty, None):
            allowed = {type(param.default), float} if type(param.default) is int else {type(param.default)}
        settable[name] = allowed
    # a parameter whose only scalar is None (tensors, lists, callbacks) cannot be set from a command line
    expressible = {n: a is None or bool(a - {type(None)}) for n, a in settable.items()}
    choices = sorted(n for n in settable if n not in RESERVED_CALL_KEYS and expressible[n])
    pipe_name = type(pipe).__name__
    for key, value in call.items():
        if key in RESERVED_CALL_KEYS:
            fix = "put prompts in --forget/--retain" if key.startswith("prompt") else "drop this setting"
            raise ErasekitError(option, key, "calibration sets this argument itself", fix)
        if key not in params:
            raise ErasekitError(option, key, f"{pipe_name}.__call__ has no such parameter", f"use one of {choices}")
        allowed = settable[key]
        if not expressible[key]:
            raise ErasekitError(option, key, f"{pipe_name}.__call__ takes {params[key].annotation} here, which a "
                                "command-line value cannot express", "drop it, or calibrate from Python "
                                "(calibrate_irece(call_kwargs=...), calibrate_cgce(encode_kwargs=...))")
        if allowed is not None and not _admits(allowed, value):
            names = " or ".join(sorted("null" if t is type(None) else t.__name__ for t in allowed))
            default = params[key].default
            example = f", e.g. {option} {key}={json.dumps(default)} (its default)" if isinstance(
                default, _SCALAR_TYPES[:4]) else ""
            raise ErasekitError(option, key, f"{pipe_name}.__call__ expects {names}, got {json.dumps(value)}",
                                f"pass {names}{example}")
    return call


def anchor_from_args(args: argparse.Namespace, concept: Concept) -> Concept | None:
    """The CGCE anchor of ``--anchor-prompts FILE [--anchor-retain FILE]``, named by ``--target``.

    The phrase matters: the anchor detector attends with it as CGCE's does with the concept's
    keywords, so it is required rather than defaulted to a made-up name. A ``--target`` without
    anchor prompts is refused for diffusion methods instead of being silently ignored.
    """
    prompts = getattr(args, "anchor_prompts", None)
    retain = getattr(args, "anchor_retain", None)
    target = (args.target or "").strip()
    if not prompts:
        if target:
            raise ErasekitError("--target", None, f"--method {args.method} reads --target only as the name of a CGCE "
                                "anchor, which needs its prompts", "add --anchor-prompts FILE (cgce), or drop --target")
        if retain:
            raise ErasekitError("--anchor-retain", None, "gives the negatives of an anchor, but there is none",
                                "add --anchor-prompts FILE and --target PHRASE, or drop --anchor-retain")
        return None
    if not target:
        raise ErasekitError("--anchor-prompts", None, "the anchor has no name to attend with",
                            "add --target PHRASE naming the anchor, e.g. --target plain")
    forget = read_prompt_file(prompts, "anchor-prompts")
    if len(forget) < 2:
        raise ErasekitError("--anchor-prompts", None, f"{prompts} has {len(forget)} prompt(s); the anchor needs at "
                            "least 2", "pass a file with a few hundred prompts that show the anchor, one per line")
    negatives = read_prompt_file(retain, "anchor-retain") if retain else []
    if retain and not negatives:  # an empty file would silently fall back to --retain minus the anchor prompts
        raise ErasekitError("--anchor-retain", None, f"{retain} has no prompts",
                            "pass a text file with one prompt per line, or drop --anchor-retain for the default")
    # concept names are at most 64 characters: the anchor's (only recorded in anchor_prompt) must fit too
    return Concept(f"{concept.name[:57]}_anchor", forget=forget, retain=negatives, keywords=[target])


def calibrate_main(args: argparse.Namespace) -> int:
    """CLI entry: load the pipeline directory, calibrate, save the pack."""
    concept = concept_from_args(args)
    if not Path(args.model).is_dir():
        raise ErasekitError("erasekit calibrate", "--model", f"{args.model} is not a directory",
                            "pass a diffusers pipeline directory (pipe.save_pretrained(...))")
    overrides = parse_overrides(args.set)
    for name in ("call_kwargs", "encode_kwargs"):
        if name in overrides:
            raise ErasekitError("--set", name, "pipeline-call settings are not hyperparameters",
                                "pass each one as --call KEY=VALUE, e.g. --call num_frames=49")
    call = parse_call_settings(getattr(args, "call", None) or [])
    anchor = anchor_from_args(args, concept)  # refused before the pipeline loads
    subphrases = read_prompt_file(args.subphrases, "subphrases") if getattr(args, "subphrases", None) else None
    pipe = DiffusionPipeline.from_pretrained(args.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    call = check_call_settings(pipe, call)
    if args.method == "cgce":
        used = {k: v for k, v in call.items() if k not in CGCE_UNUSED_CALL_KEYS}
        if len(used) < len(call):
            print(f"cgce: --call {', '.join(sorted(set(call) - set(used)))} not used (they steer denoising; CGCE "
                  "reads the conditioning the pipeline builds before its first denoiser call)", file=sys.stderr)
        pack = calibrate_cgce(pipe, concept, progress=True, encode_kwargs=used, anchor=anchor, subphrases=subphrases,
                              **overrides)
    else:
        used = call
        pack = calibrate_irece(pipe, concept, call_kwargs=used, **overrides)
    if used:  # the settings the pack's statistics were measured under: serve the pipeline with the same
        pack.hyperparameters["call_kwargs"] = dict(sorted(used.items()))
    out = pack.save_pretrained(args.output)
    print(f"wrote {args.method} pack for {concept.name!r} to {out}")
    return 0
