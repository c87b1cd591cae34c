"""Contrast pairs from templates: minimal, balanced, reproducible, and bad input named."""

from __future__ import annotations

import collections

import pytest

from erasekit.errors import ErasekitError
from erasekit.guardrails.concept import Concept
from erasekit.guardrails.pairs import contrast_pairs

TEMPLATES = ["a photo of {concept}", "{concept} on a grey background", "a drawing of {concept}, {{sketch}}"]
PHRASES = ["a star", "a five-pointed star"]
CONTRASTS = ["a circle", "a square", "a heart"]


def _slot(template: str, prompt: str) -> str:
    """What fills ``template``'s slot in ``prompt`` (the template's text around the slot must match)."""
    head, tail = template.replace("{{", "{").replace("}}", "}").split("{concept}")
    assert prompt.startswith(head) and prompt.endswith(tail), (template, prompt)
    return prompt[len(head):len(prompt) - len(tail)]


def test_every_template_with_every_phrase_and_pairs_differ_only_in_the_slot():
    forget, retain = contrast_pairs(TEMPLATES, PHRASES, CONTRASTS, seed=3)
    assert len(forget) == len(retain) == len(TEMPLATES) * len(PHRASES)
    seen = set()
    for i, (f, r) in enumerate(zip(forget, retain, strict=True)):
        template = TEMPLATES[i // len(PHRASES)]
        seen.add((template, _slot(template, f)))
        assert _slot(template, r) in CONTRASTS
    assert seen == {(t, p) for t in TEMPLATES for p in PHRASES}
    assert "a drawing of a star, {sketch}" in forget  # escaped braces stay literal


def test_contrasts_are_dealt_evenly_and_the_seed_decides():
    templates = [f"{{concept}} number {i}" for i in range(7)]
    _, retain = contrast_pairs(templates, PHRASES, CONTRASTS, seed=0)
    counts = collections.Counter(r.split(" number")[0] for r in retain)
    assert set(counts) == set(CONTRASTS) and max(counts.values()) - min(counts.values()) <= 1
    assert contrast_pairs(templates, PHRASES, CONTRASTS, seed=0) == contrast_pairs(templates, PHRASES, CONTRASTS, seed=0)
    assert contrast_pairs(templates, PHRASES, CONTRASTS, seed=0) != contrast_pairs(templates, PHRASES, CONTRASTS, seed=1)


def test_n_draws_distinct_triples():
    total = len(TEMPLATES) * len(PHRASES) * len(CONTRASTS)
    forget, retain = contrast_pairs(TEMPLATES, PHRASES, CONTRASTS, n=total, seed=5)
    assert len(set(zip(forget, retain, strict=True))) == total
    few = contrast_pairs(TEMPLATES, PHRASES, CONTRASTS, n=4, seed=5)
    assert len(few[0]) == 4 and len(set(zip(*few, strict=True))) == 4


@pytest.mark.parametrize("kwargs, field", [
    ({"templates": ["a photo of a star"]}, "templates[0]"),
    ({"templates": ["{concept} and {other}"]}, "templates[0]"),
    ({"templates": ["ok {concept}", "{concept} twice {concept}"]}, "templates[1]"),
    ({"templates": ["a {concept"]}, "templates[0]"),
    ({"templates": "a photo of {concept}"}, "templates"),
    ({"phrases": []}, "phrases"),
    ({"phrases": ["a star", " "]}, "phrases"),
    ({"contrasts": ["a circle", "A Star"]}, "contrasts"),
    ({"n": 0}, "n"),
    ({"n": 19}, "n"),
    ({"n": True}, "n"),
])
def test_bad_input_names_the_field(kwargs, field):
    args = {"templates": TEMPLATES, "phrases": PHRASES, "contrasts": CONTRASTS, **kwargs}
    with pytest.raises(ErasekitError) as err:
        contrast_pairs(**args)
    assert err.value.field == field


def test_concept_from_templates_records_how_the_prompts_were_made():
    concept = Concept.from_templates("star", TEMPLATES, PHRASES, CONTRASTS, n=5, seed=2, keywords=["star"])
    assert (list(concept.forget), list(concept.retain)) == contrast_pairs(TEMPLATES, PHRASES, CONTRASTS, n=5, seed=2)
    assert concept.metadata["pairs"] == {"templates": TEMPLATES, "phrases": PHRASES, "contrasts": CONTRASTS,
                                         "n": 5, "seed": 2}
    assert Concept.from_dict(concept.to_dict()) == concept


def test_cli_pairs_writes_the_prompt_files_calibrate_reads(tmp_path, capsys):
    from erasekit.cli import main

    files = {}
    for name, items in (("templates", TEMPLATES), ("phrases", PHRASES), ("contrasts", CONTRASTS)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(items) + "\n")
    flags = [a for name, path in files.items() for a in (f"--{name}", str(path))]
    assert main(["pairs", *flags, "--pairs", "7", "--pairs-seed", "2", "-o", str(tmp_path / "out")]) == 0
    forget = (tmp_path / "out" / "forget.txt").read_text().splitlines()
    retain = (tmp_path / "out" / "retain.txt").read_text().splitlines()
    assert (forget, retain) == contrast_pairs(TEMPLATES, PHRASES, CONTRASTS, n=7, seed=2)
    assert "wrote 7 pairs" in capsys.readouterr().out
    assert main(["pairs", "-o", str(tmp_path / "none")]) == 2
    assert "field '--templates'" in capsys.readouterr().err and not (tmp_path / "none").exists()


# ---------------------------------------------------------------- sub-phrase augmentation
def test_distinctive_subwords_keep_only_words_the_retain_prompts_never_use():
    from erasekit.guardrails.pairs import distinctive_subwords

    phrases = ["heart", "valentine heart", "heart symbol", "love heart", "red heart shape"]
    retain = ["a red circle", "a blue shape with a symbol", "a plus sign"]
    assert distinctive_subwords(phrases, retain) == {"valentine heart": ["valentine"], "love heart": ["love"]}


def test_distinctive_subwords_drop_a_word_the_encoder_places_next_to_a_retain_word():
    import numpy as np

    from erasekit.guardrails.pairs import distinctive_subwords

    axes = {"green": 0, "grass": 0, "lime": 1, "lemon": 1, "grass green": 0, "lime green": 0}

    def embed(texts):  # toy encoder: "lime" sits on "lemon"'s axis, "grass" on green's
        out = np.zeros((len(texts), 3), np.float32)
        for i, t in enumerate(texts):
            out[i, axes.get(t, 2)] = 1.0
        return out

    phrases, retain = ["green", "grass green", "lime green"], ["a lemon circle"]
    assert distinctive_subwords(phrases, retain) == {"grass green": ["grass"], "lime green": ["lime"]}
    assert distinctive_subwords(phrases, retain, embed=embed) == {"grass green": ["grass"]}


def test_subphrase_prompts_cut_the_longest_phrase_to_one_word():
    from erasekit.guardrails.pairs import subphrase_prompts

    subwords = {"valentine heart": ["valentine"], "heart symbol": ["symbol"]}
    forget = ["a red valentine heart", "a heart symbol on grey", "a heart", "a valentine hearts"]
    assert subphrase_prompts(forget, subwords) == ["a red valentine", "a symbol on grey"]
    assert subphrase_prompts(forget, subwords, seed=1) == subphrase_prompts(forget, subwords, seed=1)
