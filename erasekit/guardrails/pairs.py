"""Minimal contrast pairs: a concept's forget/retain prompts made from templates and a few phrasings.

Why pairs: a detector fitted on prompts that differ *only* in the concept's slot cannot learn the
template, the other words or the prompt length as evidence for the concept; everything but the slot
is shared by both classes. Why templates: the product promise is calibration "from a few example
prompts". Nine templates, five phrasings of the concept and a handful of contrasts give the few
hundred prompts a CGCE detector wants, without anyone writing them.

A template holds one ``{concept}`` slot (``"a photo of {concept} on a beach"``); literal braces are
written ``{{`` / ``}}``, as in :meth:`str.format`. Phrases and contrasts are inserted as they are, so
articles belong in them (``"a star"``) or in the template.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

import numpy as np

from erasekit.errors import ErasekitError

__all__ = ["SLOT", "FUNCTION_WORDS", "contrast_pairs", "distinctive_subwords", "pairs_record", "subphrase_prompts",
           "words"]

#: the placeholder a template must contain exactly once
SLOT = "concept"
#: words that never stand for a concept on their own
FUNCTION_WORDS = frozenset({"a", "an", "the", "with", "in", "of", "on", "and", "or", "to", "by", "for", "at", "as"})


def _texts(values: object, field: str, fix: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ErasekitError("contrast_pairs", field, f"expected a non-empty list of strings, got {values!r:.80}", fix)
    bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ErasekitError("contrast_pairs", field, f"items {bad[:5]} are not non-empty strings",
                            "remove empty or non-string items")
    return [v.strip() for v in values]


def _check_template(template: str, index: int) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:  # an unmatched brace
        raise ErasekitError("contrast_pairs", f"templates[{index}]", f"{template!r:.80}: {exc}",
                            "write literal braces as {{ and }}") from None
    if fields != [SLOT]:
        raise ErasekitError("contrast_pairs", f"templates[{index}]",
                            f"{template!r:.80} has placeholders {fields}, expected exactly one {{{SLOT}}}",
                            f"mark where the concept goes with {{{SLOT}}}, e.g. 'a photo of {{{SLOT}}}'")


def contrast_pairs(templates: Sequence[str], phrases: Sequence[str], contrasts: Sequence[str], *,
                   n: int | None = None, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(forget, retain)``: ``forget[i]`` and ``retain[i]`` are one template filled with a phrase of the
    concept and with a contrast (a sibling or a neutral value that must keep working).

    ``n=None`` fills every template with every phrase once; contrasts are dealt out in a seeded
    shuffle, so each is used about equally often. ``n`` draws that many distinct (template, phrase,
    contrast) triples instead, at random with ``seed``. The result depends only on the arguments.
    """
    templates = _texts(templates, "templates", "pass templates like ['a photo of {concept}', '{concept} in the snow']")
    phrases = _texts(phrases, "phrases", "pass the concept's phrasings, e.g. ['a star', 'a five-pointed star']")
    contrasts = _texts(contrasts, "contrasts", "pass phrasings of what may appear instead, e.g. ['a circle', 'a square']")
    for i, template in enumerate(templates):
        _check_template(template, i)
    shared = sorted({p.lower() for p in phrases} & {c.lower() for c in contrasts})
    if shared:
        raise ErasekitError("contrast_pairs", "contrasts", f"{shared[:3]} are also phrases of the concept; the same "
                            "prompt would be labelled both with and without it", "remove them from contrasts")
    rng = np.random.default_rng(seed)
    if n is None:
        slots = [(t, p) for t in templates for p in phrases]
        order = np.concatenate([rng.permutation(len(contrasts)) for _ in range(-(-len(slots) // len(contrasts)))])
        triples = [(t, p, contrasts[int(c)]) for (t, p), c in zip(slots, order, strict=False)]
    else:
        total = len(templates) * len(phrases) * len(contrasts)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total:
            raise ErasekitError("contrast_pairs", "n", f"got {n!r}; {len(templates)} templates x {len(phrases)} "
                                f"phrases x {len(contrasts)} contrasts make {total} distinct pairs",
                                f"pass 1 <= n <= {total}, n=None (each template with each phrase), or add templates")
        picks = rng.choice(total, size=n, replace=False)
        shape = (len(templates), len(phrases), len(contrasts))
        triples = [(templates[t], phrases[p], contrasts[c]) for t, p, c in zip(*np.unravel_index(picks, shape),
                                                                                 strict=True)]
    forget = [t.format(**{SLOT: p}) for t, p, _ in triples]
    retain = [t.format(**{SLOT: c}) for t, _, c in triples]
    return forget, retain


def pairs_record(templates: Sequence[str], phrases: Sequence[str], contrasts: Sequence[str], n: int | None,
                 seed: int) -> dict[str, object]:
    """How :func:`contrast_pairs` was called, as a concept's ``metadata["pairs"]`` records it (API and CLI alike)."""
    return {"templates": list(templates), "phrases": list(phrases), "contrasts": list(contrasts), "n": n, "seed": seed}


def words(text: str) -> list[str]:
    """Lower-case words of ``text``; hyphenated words stay whole ("five-pointed")."""
    return re.findall(r"[\w'-]+", text.lower())


def _occurs(phrase: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", re.IGNORECASE)


def distinctive_subwords(phrases: Sequence[str], retain: Sequence[str],
                         embed: Callable[[list[str]], np.ndarray] | None = None) -> dict[str, list[str]]:
    """Per multi-word phrase of the concept, the words of it that may stand for the concept alone.

    Why: a few phrasings teach a detector those exact phrasings; paraphrases reuse their *parts*
    ("valentine heart" -> "a valentine-style figure"). A word qualifies if it is not a function word,
    not itself one of ``phrases``, absent from every ``retain`` prompt (it would be labelled both
    ways), and -- when ``embed`` is given (unit vectors of the generator's own encoder, one row per
    text) -- closer to one of the concept's phrases that do not contain it than to every word of the
    retain prompts ("lime" of "lime green" goes: the encoder puts it next to "lemon").
    """
    own = {p.strip().lower() for p in phrases}
    retain_words = sorted({w for p in retain for w in words(p)} - FUNCTION_WORDS)
    seen = set(retain_words)
    candidates = {p: [w for w in dict.fromkeys(words(p)) if w not in FUNCTION_WORDS and w not in own and w not in seen]
                  for p in phrases if len(words(p)) > 1}
    candidates = {p: ws for p, ws in candidates.items() if ws}
    if embed is None or not candidates:
        return candidates
    pool = sorted({w for ws in candidates.values() for w in ws})
    vectors = embed(list(phrases) + retain_words + pool)
    phrase_vecs = vectors[:len(phrases)]
    retain_vecs = vectors[len(phrases):len(phrases) + len(retain_words)]
    word_vecs = dict(zip(pool, vectors[len(phrases) + len(retain_words):], strict=True))
    phrase_words = [set(words(p)) for p in phrases]
    kept: dict[str, list[str]] = {}
    for phrase, ws in candidates.items():
        good = []
        for w in ws:
            others = [i for i, pw in enumerate(phrase_words) if w not in pw]
            nearest_own = max((float(phrase_vecs[i] @ word_vecs[w]) for i in others), default=-1.0)
            nearest_retain = float((retain_vecs @ word_vecs[w]).max()) if len(retain_vecs) else -1.0
            if nearest_own > nearest_retain:
                good.append(w)
        if good:
            kept[phrase] = good
    return kept


def subphrase_prompts(forget: Sequence[str], subwords: dict[str, list[str]], seed: int = 0) -> list[str]:
    """Extra forget prompts: each prompt that contains a phrase of ``subwords`` (the longest one
    found), once more with that phrase replaced by one of its words, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    phrases = sorted(subwords, key=len, reverse=True)
    patterns = {p: _occurs(p) for p in phrases}
    out = []
    for prompt in forget:
        hit = next((p for p in phrases if patterns[p].search(prompt)), None)
        if hit is not None:
            word = subwords[hit][int(rng.integers(len(subwords[hit])))]
            out.append(patterns[hit].sub(word, prompt, count=1))
    return out
