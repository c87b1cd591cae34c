"""CGCE packs: what a calibrated classifier holds and how it is checked and loaded.

A ``cgce`` pack is one concept for one generator's conditioning (one set of text encoders).
It stores the ONNX detector (``classifier.onnx``: raw conditioning -> P(concept)), the torch
twin's folded weights, and the concept embedding the features attend with. Hyperparameters:

* ``seq_len``, ``embed_dim``: the conditioning shape the classifier reads (checked at attach);
* ``tau``: feature temperature; ``threshold``: detection cut on P(concept);
* ``eta``, ``max_steps``, ``target``: refinement step size (1.0 = a full Gauss-Newton step onto
  the target, see :func:`~erasekit.classifiers.twin.refine`), step cap and the probability
  refinement must at least reach (``<= threshold``);
* ``margin``, ``safe_logit``, ``unsafe_logit``: the *safety margin*. ``safe_logit`` /
  ``unsafe_logit`` are the classifier's mean training logits on retain / forget prompts
  (written by calibration); refinement goes on to ``safe_logit - margin * (unsafe_logit -
  safe_logit)`` when that is lower than ``target``'s logit: a flagged prompt is moved as far past
  the typical safe prompt as the typical unsafe prompt sits before it. Measured on the world:
  stopping just under the decision threshold (or at a fixed small probability) leaves the
  concept in many images, the margin removes it; ``margin=0`` switches it off;
* ``flat``: 1 if the features include the whole flattened conditioning (see
  :mod:`erasekit.classifiers.features`), 0 for the attention-pooled features alone (older packs);
* ``negative_guidance``: 1 to also replace, for rows this classifier flags under classifier-free
  guidance, the row's *unconditional* embedding by the optional tensor ``negative_embedding``
  (``[seq_len, embed_dim]``: the pipeline's own encoding of the concept's text, written by
  calibration, the text in ``negative_prompt``), so guidance pushes away from the concept (SLD-style);
  0 (the default; packs without the field read as 0) leaves the unconditional branch alone;
* ``negative_source``: where that unconditional row comes from -- ``"text"`` (the default:
  ``negative_embedding``) or ``"refinement"``: the row's own unconditional embedding plus what the
  refinement removed from its conditional row, ``u + (E - E')``. Why: the concept's text carries
  more than the concept (on the world it moved the other families of multi-concept images); the
  refinement's displacement is exactly what the classifier calls the concept, and the conditional
  and unconditional rows then share everything else. No tensor needed;
* ``anchor``: 1 to also steer flagged rows *towards* an anchor concept (Concept Ablation's and
  ESD/UCE's "Van Gogh -> a painting"), not only away from the concept: refinement then pushes a
  second twin -- the optional tensors ``anchor_concept_embedding`` ``[K, embed_dim]``,
  ``anchor_twin_weight`` (the same feature layout as ``twin_weight``) and ``anchor_twin_bias``
  ``[1]``, a detector of the anchor prompts -- ABOVE ``anchor_target_logit`` (calibration writes
  the anchor detector's mean training logit on the anchor prompts, and ``anchor_prompt``, a
  description of them). Why: a prompt that only loses the concept lands on "nothing of this kind
  named", and a generator may draw the concept there at its base rate (the world draws dots on
  ~31 % of style-free prompts); an anchor names the neutral value instead. 0 (packs without the
  field read as 0) ignores the anchor tensors; packs without them load as before;
* ``anchor_text``: optional words naming what a flagged prompt should show instead (``"with a plain
  fill"``, ``"fully clothed"``). For a flagged prompt given as text, the guard re-encodes ``prompt +
  anchor_text`` with the pipeline's own ``encode_prompt`` and refines *that* conditioning. Why: the
  anchor twin above steers along a classifier's gradient, which the generator need not read (on
  the world it drew plain less often, not more); words the generator was trained on it does read.
  Calls given ``prompt_embeds`` (no text) are refined without it and the report says so.
* ``detect_tau``, ``detect_flat``, ``detect_phrases``: present when the pack has a separate
  *detection head* -- ``classifier.onnx`` is then a second detector, fitted by calibration on the
  same prompts with its own feature temperature, flat block (usually off) and attention phrases
  (usually every synonym the user lists), while the twin (refinement) keeps the pack's ``tau`` and
  ``flat``. Why two models: the flat block that makes refinement move every row the denoiser reads
  also ties the detector to the training phrasings, so unseen paraphrases score low. Without it and
  attending to all synonyms, held-out paraphrase recall rose by 0.04-0.10 on each of six fresh sets
  of development seeds (``benchmarks/diffusion_erasure/results/cgce_detection_head``). It is
  opt-in: its pre-set rules failed once on one multi-concept prompt and once on one benign prompt.
  Refinement by that model, though, leaves the concept in the image. ``threshold`` applies to the
  head; ``detect_C`` and ``detect_train_accuracy`` are calibration statistics. The three are read
  at calibration only: changing them in a calibrated pack changes nothing (the head is in the ONNX
  graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from erasekit.classifiers.detector import OnnxDetector
from erasekit.classifiers.features import num_features
from erasekit.classifiers.twin import TorchTwin
from erasekit.errors import PackError
from erasekit.guardrails.methods import MethodSpec, register_method

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

    from erasekit.guardrails.pack import ConceptPack

METHOD = "cgce"
DEFAULTS: dict[str, float | int] = {"tau": 0.1, "threshold": 0.5, "eta": 1.0, "max_steps": 20, "target": 0.01,
                                    "margin": 2.0, "flat": 1, "negative_guidance": 0}
_TENSORS = ("concept_embedding", "twin_weight", "twin_bias")
#: where negative guidance's unconditional row comes from (``negative_source``)
NEGATIVE_SOURCES = ("text", "refinement")
#: hyperparameters calibration accepts (``--set``) but does not write unless given (absent: the default)
OPTIONAL_HYPERPARAMETERS = ("negative_source", "anchor_text", "detect_tau", "detect_flat", "detect_phrases")
#: hyperparameters that ask calibration for a separate detection head (any one of them does)
DETECT_HYPERPARAMETERS = ("detect_tau", "detect_flat", "detect_phrases")
#: the detection head's defaults when only some of its hyperparameters are given (the measured configuration)
DETECT_DEFAULTS: dict[str, float | int] = {"detect_tau": 0.05, "detect_flat": 0}
#: the most attention phrases a detection head takes, and the longest phrase
MAX_DETECT_PHRASES, MAX_DETECT_PHRASE = 256, 300
#: the longest ``anchor_text`` accepted (it is appended to a prompt the text encoder truncates anyway)
MAX_ANCHOR_TEXT = 300
_ANCHOR_TENSORS = ("anchor_concept_embedding", "anchor_twin_weight", "anchor_twin_bias")
_OPTIONAL_TENSORS = ("negative_embedding", *_ANCHOR_TENSORS)


def _number(hp: dict, key: str, where: str, lo: float, hi: float, integer: bool = False,
            fix: str | None = None) -> float:
    value = hp.get(key)
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise PackError(where, f"hyperparameters.{key}", f"must be {kind} in [{lo}, {hi}], got {value!r}",
                        fix or f"re-calibrate, or pass --set {key}=VALUE within range")
    return value


def validate_detection_head(hp: dict, where: str) -> None:
    """The detection head's hyperparameters, where present (at calibration and in a loaded pack)."""
    if "detect_tau" in hp:
        _number(hp, "detect_tau", where, 1e-3, 10.0)
    if "detect_flat" in hp:
        _number(hp, "detect_flat", where, 0, 1, integer=True, fix="pass --set detect_flat=0 or 1")
    if "detect_phrases" in hp:
        phrases = hp["detect_phrases"]
        if (not isinstance(phrases, list) or not 1 <= len(phrases) <= MAX_DETECT_PHRASES
                or not all(isinstance(x, str) and x.strip() and len(x) <= MAX_DETECT_PHRASE for x in phrases)):
            raise PackError(where, "hyperparameters.detect_phrases", f"must be a list of 1 to {MAX_DETECT_PHRASES} "
                            f"non-empty phrases of at most {MAX_DETECT_PHRASE} characters, got {phrases!r}",
                            """pass --set 'detect_phrases=["star", "five-pointed star"]' (the concept's synonyms)""")


def validate(pack: ConceptPack, where: str) -> None:
    hp = pack.hyperparameters
    seq_len = int(_number(hp, "seq_len", where, 1, 4096, integer=True))
    dim = int(_number(hp, "embed_dim", where, 1, 65536, integer=True))
    _number(hp, "tau", where, 1e-3, 10.0)
    threshold = _number(hp, "threshold", where, 1e-4, 1 - 1e-4)
    target = _number(hp, "target", where, 1e-4, 1 - 1e-4)
    _number(hp, "eta", where, 0.0, 1e4)
    _number(hp, "max_steps", where, 0, 10000, integer=True)
    flat = bool(_number(hp, "flat", where, 0, 1, integer=True)) if "flat" in hp else False
    if "margin" in hp:
        _number(hp, "margin", where, 0.0, 100.0)
    for key in ("safe_logit", "unsafe_logit"):
        if key in hp:
            _number(hp, key, where, -1e4, 1e4)
    if target > threshold:
        raise PackError(where, "hyperparameters.target", f"target {target} above threshold {threshold}",
                        "refinement must end under the detection threshold: set target <= threshold")
    negative_guidance = hp.get("negative_guidance", 0)
    if not isinstance(negative_guidance, int) or negative_guidance not in (0, 1):  # bools are ints
        raise PackError(where, "hyperparameters.negative_guidance", f"must be true/false (or 1/0), got "
                        f"{negative_guidance!r}", "pass --set negative_guidance=true or false")
    source = hp.get("negative_source", "text")
    if source not in NEGATIVE_SOURCES:
        raise PackError(where, "hyperparameters.negative_source", f"must be one of {list(NEGATIVE_SOURCES)}, got "
                        f"{source!r}", "pass --set negative_source=text or --set negative_source=refinement")
    anchor_text = hp.get("anchor_text")
    if anchor_text is not None and (not isinstance(anchor_text, str) or not anchor_text.strip()
                                    or len(anchor_text) > MAX_ANCHOR_TEXT):
        raise PackError(where, "hyperparameters.anchor_text", f"must be non-empty text of at most {MAX_ANCHOR_TEXT} "
                        f"characters, got {anchor_text!r}",
                        'pass --set anchor_text="with a plain fill" (words naming what to draw instead), or drop it')
    validate_detection_head(hp, where)
    names = set(pack.tensors)
    if not set(_TENSORS) <= names <= set(_TENSORS + _OPTIONAL_TENSORS):
        raise PackError(where, "tensors", f"expected tensors {sorted(_TENSORS)} (+ optional "
                        f"{sorted(_OPTIONAL_TENSORS)}), got {sorted(names)}",
                        "re-calibrate the pack with `erasekit calibrate --method cgce`")
    negative = pack.tensors.get("negative_embedding")
    if negative is not None:
        if list(negative.shape) != [seq_len, dim]:
            raise PackError(where, "tensors.negative_embedding", f"shape {list(negative.shape)} is not "
                            f"[{seq_len}, {dim}]", "re-calibrate the pack")
        if not negative.is_floating_point() or not bool(torch.isfinite(negative).all()):
            raise PackError(where, "tensors.negative_embedding", "must be finite floating point",
                            "re-calibrate the pack")
    elif negative_guidance and source == "text":
        raise PackError(where, "hyperparameters.negative_guidance", "is 1 but the pack has no "
                        "tensors.negative_embedding", "re-calibrate with this erasekit, set negative_guidance=0, "
                        "or set negative_source=refinement")
    _check_twin(pack, where, "", seq_len, dim, flat)
    anchor = hp.get("anchor", 0)
    if not isinstance(anchor, int) or anchor not in (0, 1):  # bools are ints
        raise PackError(where, "hyperparameters.anchor", f"must be true/false (or 1/0), got {anchor!r}",
                        "set it to true or false in the pack's hyperparameters, or re-calibrate with "
                        "`erasekit calibrate --method cgce --target PHRASE --anchor-prompts FILE`")
    present = [name for name in _ANCHOR_TENSORS if name in names]
    if present and len(present) < len(_ANCHOR_TENSORS):
        missing = sorted(set(_ANCHOR_TENSORS) - set(present))
        raise PackError(where, f"tensors.{missing[0]}", f"anchor tensors come together: {present} without {missing}",
                        "re-calibrate the pack with its anchor prompts")
    if present:
        _check_twin(pack, where, "anchor_", seq_len, dim, flat)
        _number(hp, "anchor_target_logit", where, -1e4, 1e4,  # written by calibration, not a --set
                fix="re-calibrate the pack with its anchor (erasekit calibrate --target PHRASE --anchor-prompts FILE)")
    elif anchor:
        raise PackError(where, "hyperparameters.anchor", "is 1 but the pack has no anchor tensors",
                        "re-calibrate with anchor prompts, or set anchor=0")


def _check_twin(pack: ConceptPack, where: str, prefix: str, seq_len: int, dim: int, flat: bool) -> None:
    """Shapes and finiteness of a twin's tensors (``prefix`` "" for the concept's, "anchor_" for the anchor's)."""
    concept = pack.tensors[f"{prefix}concept_embedding"]
    if concept.ndim != 2 or concept.shape[1] != dim or concept.shape[0] < 1:
        raise PackError(where, f"tensors.{prefix}concept_embedding", f"shape {list(concept.shape)} is not "
                        f"[K, {dim}]", "re-calibrate the pack")
    n_feat = num_features(dim, seq_len, flat)
    weight = pack.tensors[f"{prefix}twin_weight"]
    if list(weight.shape) != [n_feat]:
        raise PackError(where, f"tensors.{prefix}twin_weight", f"shape {list(weight.shape)} is not "
                        f"[{n_feat}] (flat={int(flat)})", "re-calibrate the pack")
    if list(pack.tensors[f"{prefix}twin_bias"].shape) != [1]:
        raise PackError(where, f"tensors.{prefix}twin_bias", "must have shape [1]", "re-calibrate the pack")
    if prefix:  # the concept's own twin is checked by its ONNX twin at load; the anchor has no ONNX graph
        for name in _ANCHOR_TENSORS:
            t = pack.tensors[name]
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise PackError(where, f"tensors.{name}", "must be finite floating point", "re-calibrate the pack")


register_method(MethodSpec(name=METHOD, family="diffusion", validate=validate, needs_classifier=True))


@dataclass
class CGCEClassifier:
    """A loaded ``cgce`` pack, ready to detect (ONNX) and refine (torch twin)."""

    concept: str
    detector: OnnxDetector
    twin: TorchTwin
    seq_len: int
    embed_dim: int
    threshold: float
    target: float
    eta: float
    max_steps: int
    target_logit: float = float("-inf")  # where refinement stops: min(logit(target), margin target)
    #: ``[T, D]`` unconditional embedding for flagged rows under CFG, or None (negative guidance off)
    negative_embedding: torch.Tensor | None = None
    #: negative guidance from the refinement's displacement (``negative_source: refinement``)
    negative_from_refinement: bool = False
    #: the anchor's twin, pushed above ``anchor_target_logit`` on flagged rows, or None (no anchor)
    anchor_twin: TorchTwin | None = None
    anchor_target_logit: float = float("inf")
    #: words appended to a flagged text prompt before refinement (``anchor_text``), or None
    anchor_text: str | None = None

    @classmethod
    def from_pack(cls, pack: ConceptPack) -> CGCEClassifier:
        hp = pack.hyperparameters
        where = str(pack.source or f"pack {pack.name!r}")
        seq_len, dim = int(hp["seq_len"]), int(hp["embed_dim"])
        twin = twin_from_pack(pack)
        target = float(hp["target"])
        target_logit = float(np.log(target / (1 - target)))
        if float(hp.get("margin", 0)) > 0 and "safe_logit" in hp and "unsafe_logit" in hp:
            safe, unsafe = float(hp["safe_logit"]), float(hp["unsafe_logit"])
            target_logit = min(target_logit, safe - float(hp["margin"]) * max(unsafe - safe, 0.0))
        anchor = twin_from_pack(pack, "anchor_") if hp.get("anchor") and "anchor_twin_weight" in pack.tensors else None
        return cls(
            concept=pack.name,
            detector=OnnxDetector(pack.classifier_onnx or b"", seq_len, dim, where=f"{where}/classifier.onnx"),
            twin=twin,
            seq_len=seq_len,
            embed_dim=dim,
            threshold=float(hp["threshold"]),
            target=float(hp["target"]),
            eta=float(hp["eta"]),
            max_steps=int(hp["max_steps"]),
            target_logit=target_logit,
            negative_embedding=pack.tensors["negative_embedding"].float()
            if hp.get("negative_guidance") and hp.get("negative_source", "text") == "text"
            and "negative_embedding" in pack.tensors else None,
            negative_from_refinement=bool(hp.get("negative_guidance"))
            and hp.get("negative_source", "text") == "refinement",
            anchor_twin=anchor,
            anchor_target_logit=float(hp["anchor_target_logit"]) if anchor is not None else float("inf"),
            anchor_text=hp.get("anchor_text"),
        )

    def scores(self, embeds: torch.Tensor) -> np.ndarray:
        """P(concept) per row of conditioning ``[N, T, D]``, from the ONNX detector."""
        return self.detector.predict_proba(embeds.detach().to("cpu", torch.float32).numpy())


def twin_from_pack(pack: ConceptPack, prefix: str = "") -> TorchTwin:
    """The torch twin stored in ``pack`` (``prefix="anchor_"``: the anchor's); the inverse of
    :func:`pack_tensors_from_detector`. Both twins share the pack's ``tau`` and ``flat``."""
    hp = pack.hyperparameters
    return TorchTwin(
        concept=pack.tensors[f"{prefix}concept_embedding"].float(),
        weight=pack.tensors[f"{prefix}twin_weight"].float(),
        bias=pack.tensors[f"{prefix}twin_bias"].float(),
        tau=float(hp["tau"]),
        flat=bool(hp.get("flat", 0)),
    )


def pack_tensors_from_detector(detector: Pipeline, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors a ``cgce`` pack stores for a fitted detector (``prefix="anchor_"``: for the anchor's)."""
    twin = TorchTwin.from_detector(detector)
    return {f"{prefix}concept_embedding": twin.concept, f"{prefix}twin_weight": twin.weight,
            f"{prefix}twin_bias": twin.bias}
