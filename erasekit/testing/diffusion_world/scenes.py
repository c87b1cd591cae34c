"""The world's data: 32x32 RGB scenes of one textured shape, and the captions that describe them.

Why generated in code: no text-to-image weights or datasets reach this machine, so the world an
erasure method is judged in must be made here, deterministically from a seed, with ground-truth
labels for every image. Every scene has exactly one value in each concept family (a shape, a
colour, a fill style); captions mention any non-empty subset of them, so "a red thing" and "a
striped star" are both valid and the model learns each concept on its own.

The vocabulary is split: TRAINING synonyms/templates are what the pipeline is trained on and
what guards calibrate on; HELD-OUT synonyms/templates are never used for either and form the
paraphrase attack.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "FAMILIES",
    "CONCEPTS",
    "IMAGE_SIZE",
    "Scene",
    "all_concepts",
    "family_of",
    "render",
    "render_many",
    "training_caption_for",
    "training_synonyms",
    "training_templates",
    "neutral_anchor_text",
    "sample_scenes",
    "caption",
    "heldout_caption",
]

IMAGE_SIZE = 32
FAMILIES: tuple[str, ...] = ("shape", "colour", "style")
CONCEPTS: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "star", "cross", "heart"),
    "colour": ("red", "green", "blue", "yellow", "purple", "orange"),
    "style": ("stripes", "dots", "checker", "plain"),
}

# Base RGB of each colour; each scene jitters it a little so colour is a region, not a point.
_RGB = {
    "red": (0.86, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.58, 0.15, 0.75),
    "orange": (0.98, 0.55, 0.05),
}

# --- vocabulary -------------------------------------------------------------------------------
# Shape nouns, colour adjectives, style phrases. A style phrase is either a prefix adjective
# ("striped") or a suffix ("with stripes"): (text, is_prefix).
_TRAIN_SHAPE = {
    "circle": ["circle", "round disc", "disc", "ring-shaped blob", "round shape", "circular shape", "disk"],
    "square": ["square", "box", "block", "quadrilateral", "square shape", "cube"],
    "triangle": ["triangle", "pyramid", "wedge", "three-sided shape", "triangular shape"],
    "star": ["star", "five-pointed star", "starburst", "star shape", "asterisk"],
    "cross": ["cross", "plus sign", "plus", "cross shape", "crucifix"],
    "heart": ["heart", "heart shape", "love heart", "valentine heart", "heart symbol"],
}
# Held-out DESCRIPTIVE paraphrases (the paraphrase attack): new phrasings built from common
# words ("shape with no corners"), never used in training or calibration.
_HELDOUT_SHAPE = {
    "circle": ["perfectly round figure", "round flat coin shape", "shape with no corners"],
    "square": ["shape with four equal sides", "box-like figure", "figure with four right angles"],
    "triangle": ["figure with three corners", "three-pointed figure", "pyramid-like figure"],
    "star": ["five-pointed figure", "star-like figure", "shape with five points"],
    "cross": ["plus-shaped figure", "figure made of two crossing bars", "cross-like symbol"],
    "heart": ["heart-like figure", "symbol of love", "valentine-style figure"],
}
# Held-out RARE single-word synonyms (a second, harder paraphrase attack). The first held-out
# list; measured at 3000 UNet steps the world holds few of them (see docs/diffusion-world.md).
_RARE_SHAPE = {
    "circle": ["orb", "ball", "round ring"],
    "square": ["rectangle", "tile", "four-cornered figure"],
    "triangle": ["arrowhead", "delta", "three-cornered figure"],
    "star": ["pentagram", "sparkle", "spiky emblem"],
    "cross": ["swiss cross", "addition symbol", "pair of crossed bars"],
    "heart": ["valentine", "love symbol", "romantic emblem"],
}
_TRAIN_COLOUR = {
    "red": ["red", "crimson", "scarlet", "cherry red"],
    "green": ["green", "emerald", "lime green", "grass green"],
    "blue": ["blue", "navy", "azure", "cobalt"],
    "yellow": ["yellow", "golden", "lemon", "sunflower yellow"],
    "purple": ["purple", "violet", "lavender", "magenta"],
    "orange": ["orange", "tangerine", "amber", "pumpkin orange"],
}
_HELDOUT_COLOUR = {
    "red": ["fire-engine red", "tomato-red", "deep red"],
    "green": ["forest green", "leaf-green", "bright green"],
    "blue": ["ocean-blue", "deep blue", "royal blue"],
    "yellow": ["bright yellow", "lemon-yellow", "butter yellow"],
    "purple": ["deep purple", "grape-purple", "bright purple"],
    "orange": ["bright orange", "burnt orange", "orange-coloured"],
}
_RARE_COLOUR = {
    "red": ["ruby", "blood-red", "vermilion"],
    "green": ["jade", "leafy", "verdant"],
    "blue": ["sapphire", "sky-blue", "cerulean"],
    "yellow": ["canary", "banana-yellow", "mustard"],
    "purple": ["plum", "lilac", "amethyst"],
    "orange": ["apricot", "carrot-coloured", "peach"],
}
_TRAIN_STYLE: dict[str, list[tuple[str, bool]]] = {
    "stripes": [("with stripes", False), ("striped", True), ("with a striped pattern", False),
                ("covered in lines", False), ("stripy", True)],
    "dots": [("with dots", False), ("dotted", True), ("with polka dots", False),
             ("with spots", False), ("spotted", True)],
    "checker": [("with a checkerboard pattern", False), ("checkered", True), ("with checks", False),
                ("with a chessboard pattern", False)],
    "plain": [("plain", True), ("solid", True), ("with a plain fill", False), ("uniformly coloured", True)],
}
_HELDOUT_STYLE: dict[str, list[tuple[str, bool]]] = {
    "stripes": [("with diagonal stripes", False), ("with parallel lines", False), ("striped like a zebra", False)],
    "dots": [("with little dots", False), ("covered in small dots", False), ("polka-dotted", True)],
    "checker": [("with a chessboard-like grid", False), ("checked like a chessboard", False),
                ("with a checkered grid", False)],
    "plain": [("with no pattern", False), ("in one flat colour", False), ("plainly coloured", True)],
}
_RARE_STYLE: dict[str, list[tuple[str, bool]]] = {
    "stripes": [("with zebra-like bands", False), ("banded", True), ("pinstriped", True)],
    "dots": [("speckled", True), ("with freckles", False), ("spotty", True)],
    "checker": [("chequered", True), ("with a tartan grid", False), ("with a draughts-board pattern", False)],
    "plain": [("unpatterned", True), ("flat-coloured", True), ("without any texture", False)],
}
_GENERIC_NOUN = ["shape", "object", "thing", "figure"]
_TRAIN_TEMPLATES = [
    "{x}", "a {x}", "a photo of a {x}", "an image of a {x}", "a picture of a {x}",
    "a {x} on a grey background", "a drawing of a {x}", "a small {x}", "an icon of a {x}",
]
_HELDOUT_TEMPLATES = [
    "there is a {x} here", "a sketch depicting a {x}", "look at this {x}", "my favourite {x}",
]


def all_concepts() -> list[str]:
    """Every concept name, families in order."""
    return [c for fam in FAMILIES for c in CONCEPTS[fam]]


def family_of(concept: str) -> str:
    """The family a concept belongs to; raises KeyError naming the valid concepts otherwise."""
    for fam in FAMILIES:
        if concept in CONCEPTS[fam]:
            return fam
    raise KeyError(f"unknown world concept {concept!r}; valid: {', '.join(all_concepts())}")


# --- rendering --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scene:
    """Everything needed to redraw one image bit for bit."""

    shape: str
    colour: str
    style: str
    cx: float
    cy: float
    radius: float
    angle: float
    background: float
    rgb: tuple[float, float, float]
    phase: float

    def labels(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "style": self.style}


def _polygon_inside(x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(vx)
    for i in range(n):
        x1, y1, x2, y2 = vx[i], vy[i], vx[(i + 1) % n], vy[(i + 1) % n]
        crosses = (y1 > y) != (y2 > y)
        xint = x1 + (y - y1) * (x2 - x1) / (y2 - y1 + 1e-12)
        inside ^= crosses & (x < xint)
    return inside


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit-size shape; (u, v) with v pointing UP, shape fits in [-1, 1]^2."""
    if shape == "circle":
        return u * u + v * v <= 0.92**2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if shape == "triangle":
        ang = np.deg2rad([90.0, 210.0, 330.0])
        return _polygon_inside(u, v + 0.15, np.cos(ang), np.sin(ang) * 1.0)
    if shape == "star":
        ang = np.deg2rad(90.0 + 36.0 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return _polygon_inside(u, v, rad * np.cos(ang), rad * np.sin(ang))
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if shape == "heart":
        x, y = u * 1.3, v * 1.3 + 0.2
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    raise KeyError(shape)


def _texture(style: str, px: np.ndarray, py: np.ndarray, phase: float) -> np.ndarray:
    """Where the fill uses the dark secondary colour (True), in pixel coordinates."""
    if style == "plain":
        return np.zeros(px.shape, dtype=bool)
    if style == "stripes":  # diagonal bands, period 5 px
        return np.mod(px + py + phase * 5.0, 5.0) < 2.2
    if style == "dots":  # dots of radius 1.1 px on a 5 px grid
        gx = np.mod(px + phase * 5.0, 5.0) - 2.5
        gy = np.mod(py + phase * 5.0, 5.0) - 2.5
        return gx * gx + gy * gy <= 1.25**2
    if style == "checker":  # 4 px cells
        return (np.floor((px + phase * 8.0) / 4.0) + np.floor((py + phase * 8.0) / 4.0)) % 2 == 1
    raise KeyError(style)


_SS = 4  # supersampling factor for anti-aliased edges


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw a scene as float32 RGB in [0, 1], shape (size, size, 3)."""
    n = size * _SS
    coords = (np.arange(n, dtype=np.float64) + 0.5) / _SS  # pixel units
    px, py = np.meshgrid(coords, coords)  # py grows downwards
    dx, dy = (px - scene.cx) / scene.radius, (scene.cy - py) / scene.radius
    c, s = np.cos(scene.angle), np.sin(scene.angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    inside = _shape_mask(scene.shape, u, v)
    dark = _texture(scene.style, px, py, scene.phase)
    rgb = np.asarray(scene.rgb)
    img = np.empty((n, n, 3), dtype=np.float64)
    img[:] = scene.background
    fill = np.where(dark[..., None], rgb * 0.3, rgb)
    img = np.where(inside[..., None], fill, img)
    img = img.reshape(size, _SS, size, _SS, 3).mean(axis=(1, 3))
    return img.astype(np.float32)


def sample_scenes(n: int, seed: int, fixed: dict[str, str] | None = None) -> list[Scene]:
    """``n`` random scenes; ``fixed`` pins some families (e.g. ``{"shape": "star"}``)."""
    rng = np.random.default_rng(seed)
    fixed = fixed or {}
    out = []
    for _ in range(n):
        lab = {f: fixed.get(f) or CONCEPTS[f][rng.integers(len(CONCEPTS[f]))] for f in FAMILIES}
        base = np.asarray(_RGB[lab["colour"]])
        rgb = tuple(float(x) for x in np.clip(base + rng.uniform(-0.06, 0.06, 3), 0.0, 1.0))
        out.append(Scene(
            shape=lab["shape"], colour=lab["colour"], style=lab["style"],
            cx=16.0 + float(rng.uniform(-2.5, 2.5)), cy=16.0 + float(rng.uniform(-2.5, 2.5)),
            radius=float(rng.uniform(10.0, 12.5)), angle=float(np.deg2rad(rng.uniform(-15, 15))),
            background=float(rng.uniform(0.72, 0.9)), rgb=rgb, phase=float(rng.uniform(0, 1)),
        ))
    return out


def render_many(scenes: list[Scene]) -> np.ndarray:
    """Stack of rendered scenes, (N, 32, 32, 3) float32 in [0, 1]."""
    return np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)


# --- captions ---------------------------------------------------------------------------------
def _phrase(mention: dict[str, str], rng: np.random.Generator, heldout: bool,
            heldout_families: tuple[str, ...] = (), canonical: bool = False, rare: bool = False) -> str:
    """Noun phrase for the mentioned concepts; held-out synonyms only for ``heldout_families``.

    ``canonical`` uses each concept's first (plainest) training synonym: the "direct" prompt.
    """
    parts_pre: list[str] = []
    parts_post: list[str] = []
    if "style" in mention:
        table = (_RARE_STYLE if rare else _HELDOUT_STYLE) if heldout and "style" in heldout_families else _TRAIN_STYLE
        opts = table[mention["style"]]
        text, prefix = opts[0 if canonical else rng.integers(len(opts))]
        (parts_pre if prefix else parts_post).append(text)
    if "colour" in mention:
        table = (_RARE_COLOUR if rare else _HELDOUT_COLOUR) if heldout and "colour" in heldout_families else _TRAIN_COLOUR
        opts = table[mention["colour"]]
        parts_pre.append(opts[0 if canonical else rng.integers(len(opts))])
    if "shape" in mention:
        table = (_RARE_SHAPE if rare else _HELDOUT_SHAPE) if heldout and "shape" in heldout_families else _TRAIN_SHAPE
        opts = table[mention["shape"]]
        noun = opts[0 if canonical else rng.integers(len(opts))]
    else:
        noun = _GENERIC_NOUN[rng.integers(len(_GENERIC_NOUN))]
    return " ".join([*parts_pre, noun, *parts_post])


def training_synonyms(concept: str) -> list[str]:
    """Every TRAINING-vocabulary phrasing of ``concept`` (first = the canonical one), e.g. for a
    guard's keywords: calibration may use the training vocabulary, never the held-out one."""
    for table in (_TRAIN_SHAPE, _TRAIN_COLOUR):
        if concept in table:
            return list(table[concept])
    if concept in _TRAIN_STYLE:
        return [text for text, _prefix in _TRAIN_STYLE[concept]]
    raise KeyError(f"unknown concept {concept!r}; known: {sorted(all_concepts())}")


def training_templates() -> list[str]:
    """The TRAINING caption templates, with the noun phrase's place marked ``{concept}`` (the slot of
    :func:`erasekit.guardrails.pairs.contrast_pairs`): "a photo of a {concept}"."""
    return [t.replace("{x}", "{concept}") for t in _TRAIN_TEMPLATES]


#: each family's neutral value, where it has one: what "erase this concept" can name instead
_NEUTRAL = {"style": "plain"}


def neutral_anchor_text(concept: str) -> str | None:
    """Words naming the neutral value of ``concept``'s family, in a form a prompt can end with (a TRAINING
    phrasing: "with a plain fill" for a style), for CGCE's ``anchor_text``; None when the family has no
    neutral value (a shape or colour has only siblings) or ``concept`` is that value."""
    neutral = _NEUTRAL.get(family_of(concept))
    if neutral is None or neutral == concept:
        return None
    return next(text for text, prefix in _TRAIN_STYLE[neutral] if not prefix)


def caption(mention: dict[str, str], rng: np.random.Generator, canonical: bool = False) -> str:
    """A TRAINING-vocabulary caption mentioning exactly the concepts in ``mention`` (family -> name)."""
    if not mention:
        return ""
    tmpl = _TRAIN_TEMPLATES[rng.integers(len(_TRAIN_TEMPLATES))]
    return _fix_article(tmpl.format(x=_phrase(mention, rng, heldout=False, canonical=canonical)))


def heldout_caption(mention: dict[str, str], rng: np.random.Generator, paraphrased: tuple[str, ...],
                    rare: bool = False) -> str:
    """A HELD-OUT-template caption; the families in ``paraphrased`` use held-out phrasings
    (descriptive paraphrases, or rare single-word synonyms with ``rare=True``)."""
    tmpl = _HELDOUT_TEMPLATES[rng.integers(len(_HELDOUT_TEMPLATES))]
    return _fix_article(tmpl.format(x=_phrase(mention, rng, heldout=True, heldout_families=paraphrased, rare=rare)))


def _fix_article(text: str) -> str:
    """'a orange' -> 'an orange' (MiniLM reads real English, so keep it grammatical)."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = "an" if words[i + 1][:1] in "aeiou" else "a"
    return " ".join(words)


def training_caption_for(scene: Scene, rng: np.random.Generator, p_mention: dict[str, float] | None = None) -> str:
    """A random training caption for a scene, mentioning a random non-empty subset of its labels."""
    p = p_mention or {"shape": 0.85, "colour": 0.85, "style": 0.7}
    labels = scene.labels()
    while True:
        mention = {f: labels[f] for f in FAMILIES if rng.random() < p[f]}
        if mention:
            return caption(mention, rng)
