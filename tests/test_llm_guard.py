"""The transformers guard on a tiny random Llama: per-row toggles, padding, bit-identity, errors."""

from __future__ import annotations

import pytest
import torch

from erasekit import Concept, ConceptPack, PackError, PolicyError
from erasekit.errors import ErasekitError
from erasekit.integrations.transformers import TransformersGuard, find_decoder_layers
from erasekit.integrations.transformers_calibrate import calibrate, collect_activations
from erasekit.testing.tiny_llama import build_tiny_llama

FORGET = [f"Tell me everything about the wizard Zorvath number {i} and his wand" for i in range(12)]
RETAIN = [f"What is {i} plus {i + 3}? Show the sum." for i in range(12)]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama(0)


@pytest.fixture(scope="module")
def packs(tiny, tmp_path_factory):
    model, tok = tiny
    concept = Concept("zorvath", forget=FORGET, retain=RETAIN, keywords=["Zorvath"])
    out = {}
    root = tmp_path_factory.mktemp("packs")
    mll = calibrate(model, concept, "mllmeraser", tokenizer=tok, progress=False,
                    hyperparameters={"strength": -8.0})
    # gate_tau far below 0 keeps the gate open, so the edit is visible on a random model
    kif = calibrate(model, Concept("wands", forget=FORGET, retain=RETAIN), "kif", tokenizer=tok, progress=False,
                    hyperparameters={"gate_tau": -50.0, "suppression": 1.0, "num_layers": 2})
    out["mllmeraser"] = str(mll.save_pretrained(root / "mll"))
    out["kif"] = str(kif.save_pretrained(root / "kif"))
    return out


def _batch(tok, texts, side):
    tok.padding_side = side
    try:
        return tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "left"


def _hooks(model):
    """Ids of every forward (pre-)hook; transformers installs its own for output capture."""
    return sorted((name, kind, key) for name, m in model.named_modules()
                  for kind, hooks in (("pre", m._forward_pre_hooks), ("post", m._forward_hooks)) for key in hooks)


def test_decoder_layers_found_without_architecture_tables(tiny):
    from transformers import GPT2Config, GPT2LMHeadModel

    assert len(find_decoder_layers(tiny[0])) == 4
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    assert [type(m).__name__ for m in find_decoder_layers(gpt2)] == ["GPT2Block"] * 3


def test_calibration_reads_the_tensor_the_hook_edits(tiny):
    """Activations come from decoder-layer outputs = transformers' hidden_states[i + 1]."""
    model, tok = tiny
    acts = collect_activations(model, tok, RETAIN[:3], progress=False)
    enc = tok(RETAIN[:1], return_tensors="pt")
    with torch.inference_mode():
        hs = model(**enc, output_hidden_states=True).hidden_states
    for i in range(3):  # the last entry is after the final norm
        torch.testing.assert_close(acts["last"][i, 0], hs[i + 1][0, -1])


@pytest.mark.parametrize("method", ["mllmeraser", "kif"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_per_row_toggles_in_one_batch(tiny, packs, method, side):
    model, tok = tiny
    hooks = _hooks(model)
    enc = _batch(tok, [FORGET[0], RETAIN[0] + " and more words here"], side)
    with torch.inference_mode():
        base = model(**enc).logits
        with TransformersGuard(model, [packs[method]]) as g:
            name = next(iter(g.packs))
            both = g(**enc, erase=[[name], []]).logits
            alone = g(**_batch(tok, [FORGET[0]], side), erase=[name]).logits
    assert torch.equal(both[1], base[1])  # row B: not erased, bit-identical
    real = enc["attention_mask"][0].bool()
    assert not torch.allclose(both[0][real], base[0][real])  # row A: erased
    # padding (either side) does not change what the erased row sees
    torch.testing.assert_close(both[0][real], alone[0], atol=1e-4, rtol=1e-4)
    assert _hooks(model) == hooks


@pytest.mark.parametrize("method", ["mllmeraser", "kif"])
def test_generate_per_row_and_benign_bit_identical(tiny, packs, method):
    model, tok = tiny
    enc = _batch(tok, [FORGET[1], RETAIN[1]], "left")
    kw = {"max_new_tokens": 6, "do_sample": False}
    base = model.generate(**enc, **kw)
    with TransformersGuard(model, [packs[method]]) as g:
        name = next(iter(g.packs))
        benign = g.generate(**enc, **kw)
        mixed = g.generate(**enc, erase=[[name], None], **kw)
        scores = g.generate(**enc, erase=[[name], None], output_scores=True, return_dict_in_generate=True, **kw)
    ref = model.generate(**enc, output_scores=True, return_dict_in_generate=True, **kw)
    assert torch.equal(benign, base)
    assert torch.equal(mixed[1], base[1])
    assert torch.equal(scores.scores[0][1], ref.scores[0][1])
    assert not torch.equal(scores.scores[0][0], ref.scores[0][0])


def test_detach_restores_the_model_bit_for_bit(tiny, packs):
    model, tok = tiny
    hooks = _hooks(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    enc = _batch(tok, FORGET[:2], "left")
    with torch.inference_mode():
        ref = model(**enc).logits
    g = TransformersGuard(model, [packs["mllmeraser"], packs["kif"]], mandatory=["zorvath"])
    assert g.attached and _hooks(model) != hooks
    with torch.inference_mode():
        assert not torch.equal(model(**enc).logits, ref)  # mandatory applies to direct calls too
    g.detach()
    assert _hooks(model) == hooks and not hasattr(model, "_erasekit_guard")
    with torch.inference_mode():
        assert torch.equal(model(**enc).logits, ref)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_mandatory_cannot_be_disabled_and_unknown_toggle_fails_before_generation(tiny, packs):
    model, tok = tiny
    hooks = _hooks(model)
    enc = _batch(tok, FORGET[:2], "left")
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with TransformersGuard(model, [packs["mllmeraser"], packs["kif"]], mandatory=["zorvath"]) as g:
            with pytest.raises(PolicyError, match="unknown concept 'nope'"):
                g.generate(**enc, erase=[["nope"], []], max_new_tokens=2)
            with pytest.raises(PolicyError, match="mandatory"):
                g.generate(**enc, erase=["-zorvath"], max_new_tokens=2)
            with pytest.raises(ErasekitError, match="per-row toggles"):
                g.generate(**enc, erase=[["wands"], [], []], max_new_tokens=2)
            assert not calls  # nothing ran
            assert g.active_concepts([["wands"], []], input_ids=enc["input_ids"]) == [
                frozenset({"zorvath", "wands"}), frozenset({"zorvath"})]
    finally:
        handle.remove()
    assert _hooks(model) == hooks


def test_pack_for_another_model_or_layer_count_is_refused_before_attaching(tiny, packs, tmp_path):
    model, tok = tiny
    other, _ = build_tiny_llama(1)
    with pytest.raises(PackError, match="embedding_sha256"):
        TransformersGuard(other, [packs["kif"]])
    assert _hooks(other) == []
    deeper, _ = build_tiny_llama(0, num_layers=6)
    with pytest.raises(PackError, match="num_layers"):
        TransformersGuard(deeper, [packs["mllmeraser"]])
    assert _hooks(deeper) == []
    # a pack whose layer indices exceed its own fingerprint is refused at load time
    pack = ConceptPack.from_pretrained(packs["mllmeraser"])
    pack.tensors["layers"] = pack.tensors["layers"] + 10
    with pytest.raises(PackError, match="layer indices"):
        pack.save_pretrained(tmp_path / "bad")


def test_second_guard_on_same_model_is_refused(tiny, packs):
    model, _ = tiny
    hooks = _hooks(model)
    with TransformersGuard(model, [packs["kif"]]):
        with pytest.raises(ErasekitError, match="already has an erasekit guard"):
            TransformersGuard(model, [packs["mllmeraser"]])
    assert _hooks(model) == hooks


def test_error_inside_guarded_generate_leaves_guard_consistent(tiny, packs):
    model, tok = tiny
    enc = _batch(tok, FORGET[:2], "left")
    with TransformersGuard(model, [packs["kif"]]) as g:
        with pytest.raises(Exception):  # noqa: B017 - transformers raises its own type for a bad kwarg
            g.generate(**enc, erase=["wands"], max_new_tokens=2, not_a_generate_argument=1)
        assert g._state is None
        out = g.generate(**enc, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, model.generate(**enc, max_new_tokens=3, do_sample=False))


def test_erasekit_guard_entry_point_dispatches_to_transformers(tiny, packs):
    import erasekit

    model, _ = tiny
    with erasekit.guard(model, packs=[packs["kif"]]) as g:
        assert isinstance(g, TransformersGuard)
    with pytest.raises(ErasekitError, match="neither a transformers model"):
        erasekit.guard(object(), packs=[])
