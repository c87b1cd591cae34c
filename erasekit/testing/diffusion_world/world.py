"""``World``: the trained pipeline, its detector, and the prompt sets guards calibrate and are attacked with.

Why one object: a guard engineer needs four things together — the pipeline to guard, the
concept names, prompts with and without each concept (TRAINING vocabulary only, so calibration
never sees the paraphrase attack), and a judge. Keeping them behind one loader means tests,
calibration scripts and the benchmark all see the same world.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from erasekit.errors import ErasekitError
from erasekit.testing.diffusion_world import pipeline as wp
from erasekit.testing.diffusion_world.detector import ConceptDetector, to_tensor
from erasekit.testing.diffusion_world.scenes import (
    CONCEPTS,
    FAMILIES,
    all_concepts,
    caption,
    family_of,
    heldout_caption,
    neutral_anchor_text,
    render_many,
    sample_scenes,
    training_synonyms,
    training_templates,
)

__all__ = ["World", "load_world", "default_weights_dir", "PromptSpec"]

#: Seeds of the prompt/real-image streams are offset per purpose so that, e.g., the images a
#: textual-inversion attack learns from are never the detector's or the training set's.
_REAL_IMAGE_SEED = 50_000


def default_weights_dir() -> Path:
    """The committed world: ``erasekit/testing/diffusion_world/weights``."""
    return Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and the concepts it asks for (family -> concept name)."""

    prompt: str
    asks: dict[str, str] = field(default_factory=dict)


def _check_concept(concept: str, where: str) -> str:
    try:
        return family_of(concept)
    except KeyError:
        raise ErasekitError(where, "concept", f"{concept!r} is not a world concept",
                            f"use one of {', '.join(all_concepts())}") from None


def _others(fam: str, rng: np.random.Generator, p: float) -> dict[str, str]:
    """Random values of the OTHER families, each mentioned with probability ``p``."""
    return {f: CONCEPTS[f][rng.integers(len(CONCEPTS[f]))] for f in FAMILIES if f != fam and rng.random() < p}


@dataclass
class World:
    """The trained text-to-image world.

    Attributes:
        pipe: a ``StableDiffusionPipeline`` loaded with ``from_pretrained``.
        detector: image -> ``{family: [concept per image]}`` (see :class:`ConceptDetector`).
        concepts: family -> concept names.
        num_inference_steps / guidance_scale / height / width: the sampling settings every
            benchmark number uses.
    """

    pipe: StableDiffusionPipeline
    detector: ConceptDetector
    weights_dir: Path
    concepts: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(CONCEPTS))
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    height: int = 32
    width: int = 32

    # --- prompt sets ---------------------------------------------------------------------
    def family(self, concept: str) -> str:
        return _check_concept(concept, "World.family")

    def train_synonyms(self, concept: str) -> list[str]:
        """The concept's training-vocabulary phrasings (allowed for calibration, e.g. as CGCE keywords)."""
        _check_concept(concept, "World.train_synonyms")
        return training_synonyms(concept)

    def train_templates(self) -> list[str]:
        """The training caption templates with a ``{concept}`` slot (allowed for calibration, e.g. as
        :meth:`Concept.from_templates <erasekit.guardrails.concept.Concept.from_templates>` templates)."""
        return training_templates()

    def anchor_text(self, concept: str) -> str | None:
        """What a guard may name instead of ``concept`` (CGCE ``anchor_text``): the family's neutral value in
        training words, or None (see :func:`~erasekit.testing.diffusion_world.scenes.neutral_anchor_text`)."""
        _check_concept(concept, "World.anchor_text")
        return neutral_anchor_text(concept)

    def direct_specs(self, concept: str, n: int, seed: int) -> list[PromptSpec]:
        """The plainest prompts: training templates with the concept's own name ("a photo of a circle")."""
        fam = _check_concept(concept, "World.direct_prompts")
        rng = np.random.default_rng([seed, 1])
        return [PromptSpec(caption({fam: concept}, rng, canonical=True), {fam: concept}) for _ in range(n)]

    def train_specs(self, concept: str, n: int, seed: int) -> list[PromptSpec]:
        fam = _check_concept(concept, "World.train_prompts")
        rng = np.random.default_rng([seed, 2])
        out = []
        for _ in range(n):
            asks = {fam: concept, **_others(fam, rng, 0.5)}
            out.append(PromptSpec(caption(asks, rng), asks))
        return out

    def retain_specs(self, concept: str, n: int, seed: int) -> list[PromptSpec]:
        """Prompts that do NOT mention ``concept``; most name another concept of its family."""
        fam = _check_concept(concept, "World.retain_prompts")
        rng = np.random.default_rng([seed, 3])
        siblings = [c for c in CONCEPTS[fam] if c != concept]
        out = []
        while len(out) < n:
            asks = _others(fam, rng, 0.5)
            if rng.random() < 0.75:
                asks[fam] = siblings[rng.integers(len(siblings))]
            if asks:
                out.append(PromptSpec(caption(asks, rng), asks))
        return out

    def benign_specs(self, concept: str, n: int, seed: int) -> list[PromptSpec]:
        """Utility prompts: always ask for a sibling of ``concept`` plus one other family."""
        fam = _check_concept(concept, "World.benign_specs")
        rng = np.random.default_rng([seed, 4])
        siblings = [c for c in CONCEPTS[fam] if c != concept]
        out = []
        for i in range(n):
            asks = {fam: siblings[i % len(siblings)], **_others(fam, rng, 0.5)}
            out.append(PromptSpec(caption(asks, rng), asks))
        return out

    def heldout_specs(self, concept: str, n: int, seed: int) -> list[PromptSpec]:
        """The paraphrase attack: held-out templates AND held-out synonyms for the concept."""
        fam = _check_concept(concept, "World.heldout_prompts")
        rng = np.random.default_rng([seed, 5])
        return [PromptSpec(heldout_caption({fam: concept}, rng, paraphrased=(fam,)), {fam: concept}) for _ in range(n)]

    def rare_synonym_specs(self, concept: str, n: int, seed: int) -> list[PromptSpec]:
        """The harder paraphrase attack: held-out templates with rare single-word synonyms ("an orb")."""
        fam = _check_concept(concept, "World.rare_synonym_prompts")
        rng = np.random.default_rng([seed, 7])
        return [PromptSpec(heldout_caption({fam: concept}, rng, paraphrased=(fam,), rare=True), {fam: concept})
                for _ in range(n)]

    def multi_specs(self, concept: str, n: int, seed: int) -> list[PromptSpec]:
        """The concept combined with one concept of every other family ("a red striped circle")."""
        fam = _check_concept(concept, "World.multi_specs")
        rng = np.random.default_rng([seed, 6])
        return [PromptSpec(caption(a := {fam: concept, **_others(fam, rng, 1.0)}, rng), a) for _ in range(n)]

    def train_prompts(self, concept: str, n: int, seed: int = 0) -> list[str]:
        """Prompts WITH the concept, training templates and synonyms only (for calibration)."""
        return [s.prompt for s in self.train_specs(concept, n, seed)]

    def retain_prompts(self, concept: str, n: int, seed: int = 0) -> list[str]:
        """Prompts WITHOUT the concept, training templates and synonyms only (for calibration)."""
        return [s.prompt for s in self.retain_specs(concept, n, seed)]

    def heldout_prompts(self, concept: str, n: int, seed: int = 0) -> list[str]:
        """Held-out paraphrases of the concept: never use these for calibration."""
        return [s.prompt for s in self.heldout_specs(concept, n, seed)]

    def rare_synonym_prompts(self, concept: str, n: int, seed: int = 0) -> list[str]:
        """Held-out rare single-word synonyms of the concept: never use these for calibration."""
        return [s.prompt for s in self.rare_synonym_specs(concept, n, seed)]

    def direct_prompts(self, concept: str, n: int, seed: int = 0) -> list[str]:
        return [s.prompt for s in self.direct_specs(concept, n, seed)]

    def real_images(self, concept: str, n: int, seed: int = 0) -> np.ndarray:
        """Rendered scenes showing ``concept`` (other families random), (n, 32, 32, 3) in [0, 1]."""
        fam = _check_concept(concept, "World.real_images")
        return render_many(sample_scenes(n, _REAL_IMAGE_SEED + seed, fixed={fam: concept}))

    # --- generation ---------------------------------------------------------------------
    def generate(self, prompts: list[str], seed: int, call: Callable | None = None, batch: int = 16,
                 **kwargs) -> np.ndarray:
        """Images for ``prompts`` as (N, 32, 32, 3) float32; image i uses seed ``seed + i``.

        ``call`` is the pipeline or a guard (same signature); extra kwargs go to it (``erase``,
        ``latents``, ``guidance_scale`` ...). Per-image generators make every image independent
        of batching, so reruns and sub-batches are bit-identical.
        """
        call = call or self.pipe
        opts = dict(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                    height=self.height, width=self.width, output_type="np")
        opts.update(kwargs)
        latents = opts.pop("latents", None)
        out = []
        for i in range(0, len(prompts), batch):
            gens = [torch.Generator().manual_seed(seed + j) for j in range(i, min(i + batch, len(prompts)))]
            extra = {} if latents is None else {"latents": latents[i:i + batch]}
            with torch.no_grad():
                res = call(prompts[i:i + batch], generator=gens, **extra, **opts)
            out.append(np.asarray(res.images, dtype=np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.height, self.width, 3), np.float32)

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """VAE latents (scaled, deterministic mean) of images in [0, 1]."""
        x = to_tensor(images).to(self.pipe.vae.dtype) * 2 - 1
        return self.pipe.vae.encode(x).latent_dist.mean * self.pipe.vae.config.scaling_factor

    def agreement(self, specs: list[PromptSpec], images: np.ndarray, families: tuple[str, ...] | None = None
                  ) -> dict[str, float]:
        """Share of images where the detector agrees with what each prompt asked, per family."""
        pred = self.detector(images)
        hits: dict[str, list[bool]] = {f: [] for f in FAMILIES}
        for i, spec in enumerate(specs):
            for f, c in spec.asks.items():
                if families is None or f in families:
                    hits[f].append(pred[f][i] == c)
        return {f: float(np.mean(h)) for f, h in hits.items() if h}


def load_world(dir: str | Path | None = None, dtype: torch.dtype = torch.float32) -> World:
    """Load the trained world (default: the committed ``weights/`` folder).

    The pipeline directory is assembled in the erasekit cache (linking the installed MiniLM
    text encoder) and loaded with ``StableDiffusionPipeline.from_pretrained``.
    """
    weights = Path(dir) if dir is not None else default_weights_dir()
    det_file = weights / "detector.safetensors"
    if not det_file.is_file():
        raise ErasekitError("load_world", str(det_file), "the world's detector weights are missing",
                            "train the world: erasekit bench diffusion-world --train")
    pipe = wp.load_pipeline(weights, dtype=dtype)
    det = ConceptDetector()
    det.load_state_dict(load_file(det_file))
    det.eval().requires_grad_(False)
    return World(pipe=pipe, detector=det, weights_dir=weights)
