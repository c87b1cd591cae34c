"""`erasekit calibrate` for LLM methods, the router (real all-MiniLM-L6-v2), and pack validation."""

from __future__ import annotations

import pytest
import torch

from erasekit import Concept, ConceptPack, PackError
from erasekit.cli import main
from erasekit.errors import ErasekitError
from erasekit.integrations.transformers_calibrate import calibrate
from erasekit.steering.router import ConceptRouter, fit_centroid, get_embedder
from erasekit.testing.tiny_llama import save_tiny_llama

FORGET = [f"Tell me about the wizard Zorvath and spell number {i}" for i in range(10)]
RETAIN = [f"What is {i} times {i + 2}?" for i in range(10)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.mark.parametrize("method", ["mllmeraser", "kif"])
def test_cli_calibrate_writes_a_valid_pack(model_dir, tmp_path, method, capsys):
    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text("\n".join(FORGET) + "\n")
    retain.write_text("# comment lines are skipped\n" + "\n".join(RETAIN) + "\n")
    out = tmp_path / "pack"
    rc = main(["calibrate", "--model", str(model_dir), "--concept", "zorvath", "--forget", str(forget),
               "--retain", str(retain), "--method", method, "--keywords", "Zorvath", "--set", "router=\"keywords\"",
               "-o", str(out)])
    assert rc == 0
    pack = ConceptPack.from_pretrained(out)
    assert pack.method == method and len(pack.concept.retain) == 10
    assert pack.hyperparameters["router"] == "keywords"
    assert pack.hyperparameters["hook_site"] == "decoder_layer_output"
    assert main(["info", str(out)]) == 0
    assert "zorvath" in capsys.readouterr().out


def test_cli_calibrate_llm_pack_from_templates(model_dir, tmp_path):
    """--templates makes the prompts for LLM methods too: the pairs are method-agnostic text."""
    (tmp_path / "t.txt").write_text("Tell me about {concept}.\nWho is {concept}?\nWrite a story about {concept}.\n")
    (tmp_path / "p.txt").write_text("the wizard Zorvath\nZorvath the Grey\n")
    (tmp_path / "c.txt").write_text("the baker Emma\nthe pilot Jonas\nthe gardener Ruth\n")
    out = tmp_path / "pack"
    rc = main(["calibrate", "--model", str(model_dir), "--concept", "zorvath", "--templates", str(tmp_path / "t.txt"),
               "--phrases", str(tmp_path / "p.txt"), "--contrasts", str(tmp_path / "c.txt"), "--method", "kif",
               "--keywords", "Zorvath", "--set", "router=\"keywords\"", "-o", str(out)])
    assert rc == 0
    concept = ConceptPack.from_pretrained(out).concept
    assert len(concept.forget) == len(concept.retain) == 6 and "Who is Zorvath the Grey?" in concept.forget
    assert all("Zorvath" not in r for r in concept.retain)
    assert concept.metadata["pairs"]["contrasts"] == ["the baker Emma", "the pilot Jonas", "the gardener Ruth"]


def test_cli_calibrate_bad_input_is_a_clear_error(model_dir, tmp_path, capsys):
    retain = tmp_path / "retain.txt"
    retain.write_text("\n".join(RETAIN))
    rc = main(["calibrate", "--model", str(model_dir), "--concept", "x", "--forget", str(tmp_path / "missing.txt"),
               "--retain", str(retain), "--method", "kif", "-o", str(tmp_path / "p")])
    assert rc == 2 and "--forget file does not exist" in capsys.readouterr().err
    forget = tmp_path / "forget.txt"
    forget.write_text("\n".join(FORGET))
    rc = main(["calibrate", "--model", str(model_dir), "--concept", "x", "--forget", str(forget),
               "--retain", str(retain), "--method", "kif", "--set", "no_such_knob=1", "-o", str(tmp_path / "p")])
    assert rc == 2 and "unknown hyperparameter" in capsys.readouterr().err


def test_hyperparameters_are_validated_at_load(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    pack = calibrate(model, Concept("z", forget=FORGET, retain=RETAIN), "kif", tokenizer=tok, progress=False)
    pack.hyperparameters["suppression"] = float("nan")
    with pytest.raises(PackError, match="non-finite"):
        pack.save_pretrained(tmp_path / "bad")
    pack.hyperparameters["suppression"] = 99.0
    with pytest.raises(PackError, match="suppression"):
        pack.validate()
    with pytest.raises(ErasekitError, match="router"):
        calibrate(model, Concept("z", forget=FORGET, retain=RETAIN), "kif", tokenizer=tok, progress=False,
                  hyperparameters={"router": "keywords"})


def test_router_minilm_centroid_and_keyword_fallback():
    forget = ["Who is the headmaster of Hogwarts?", "What house is Harry Potter in?",
              "Which spell did Hermione Granger use?", "Tell me about Quidditch at Hogwarts."]
    centroid = fit_centroid(forget)
    assert centroid.shape == (384,) and torch.isclose(centroid.norm(), torch.tensor(1.0))
    router = ConceptRouter("harry_potter", centroid, threshold=0.5, keywords=["Voldemort"])
    assert router.matches("Who teaches potions to Harry Potter at Hogwarts school?")
    assert router.matches("is voldemort real")  # keyword, case-insensitive, whole word
    assert not router.matches("What is the capital of Japan?")
    assert not router.matches("Voldemortish is not a word")
    sims = router.similarities(["Harry Potter and the wizards of Hogwarts", "How do I bake bread?"])
    assert sims[0] > 0.5 > sims[1]
    assert get_embedder() is get_embedder()  # one shared copy per process
