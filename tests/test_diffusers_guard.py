"""The diffusers guard on a tiny random SD pipeline: toggles, bit-identity, detach, errors, IRECE plumbing."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
import torch

from erasekit.errors import ErasekitError, PackError, PolicyError
from erasekit.guardrails.concept import Concept
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.diffusers import HOOK_NAME, DiffusersGuard, guard
from erasekit.integrations.diffusers_calibrate import calibrate_cgce, calibrate_irece, encode_conditioning
from erasekit.testing import build_tiny_sd_pipeline

SHAPES = ["circle", "square", "star", "heart", "cross"]
BACKS = ["white", "black", "grey"]
KW = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "pt"}
RED = "a red star on a white background"
BLUE = "a blue heart on a grey background"


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@contextlib.contextmanager
def first_conditioning(pipe) -> Iterator[list[torch.Tensor]]:
    """Inside the block, the list receives the conditioning the first cross-attention saw at the first step."""
    seen: list[torch.Tensor] = []
    attn = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
    handle = attn.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["encoder_hidden_states"].clone()) if not seen else None, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def guarded_first_conditioning(pipe, packs, prompts, erase, guard_kwargs=None, **kwargs):
    """Images, the conditioning the first cross-attention received at the first step, and the report,
    for one guarded call (the tests' sampling settings ``KW``, overridden by ``kwargs``)."""
    with first_conditioning(pipe) as seen, guard(pipe, packs, **(guard_kwargs or {})) as g:
        images = g(prompts, generator=_gen(), erase=erase, **{**KW, **kwargs}).images
        report = g.last_report
    return images, seen[0], report


@pytest.fixture(scope="module")
def red_concept():
    forget = [f"a red {s} on a {b} background" for s in SHAPES for b in BACKS]
    retain = [f"a {c} {s} on a {b} background" for c in ("blue", "green") for s in SHAPES for b in BACKS]
    return Concept("red", forget=forget, retain=retain, keywords=["red"])


@pytest.fixture(scope="module")
def packs(pipe, red_concept):
    irece_pack = calibrate_irece(pipe, red_concept, n_prompts=8, threshold=0.0, end=1.0,
                                 call_kwargs={"num_inference_steps": 2, "height": 32, "width": 32})
    return calibrate_cgce(pipe, red_concept), irece_pack


@pytest.fixture(scope="module")
def baseline(pipe):
    return pipe([RED, BLUE], generator=_gen(), **KW).images


def test_flagged_prompt_refined_benign_bit_identical(pipe, packs, baseline):
    with guard(pipe, [packs[0]]) as g:
        out = g([RED, BLUE], generator=_gen(), erase=["red"], **KW).images
        report = g.last_report
    assert report.flagged["red"] == [2]  # CFG rows [uncond RED, uncond BLUE, RED, BLUE]: only cond RED
    assert not torch.equal(out[0], baseline[0])
    assert torch.equal(out[1], baseline[1])


def test_guard_runs_under_inference_mode(pipe, packs, baseline):
    """Serving code often wraps calls in ``torch.inference_mode()``; its tensors have no version
    counter, which the conditioning cache must not rely on."""
    with guard(pipe, [packs[0]]) as g:
        expected = g([RED, BLUE], generator=_gen(), erase=["red"], **KW).images
        with torch.inference_mode():
            out = g([RED, BLUE], generator=_gen(), erase=["red"], **KW).images
    assert torch.equal(out, expected)
    assert torch.equal(out[1], baseline[1]) and not torch.equal(out[0], baseline[0])


def test_no_erase_is_bit_identical_and_per_prompt_toggles(pipe, packs, baseline):
    with guard(pipe, [packs[0]]) as g:
        assert torch.equal(g([RED, BLUE], generator=_gen(), **KW).images, baseline)
        per_prompt = g([RED, RED], generator=_gen(), erase=[[], ["red"]], **KW).images
        unguarded = pipe([RED, RED], generator=_gen(), **KW).images
    # The first prompt did not ask for red: it matches the unguarded image for the same noise.
    assert torch.equal(per_prompt[0], unguarded[0])
    assert not torch.equal(per_prompt[1], per_prompt[0])


def test_prompt_embeds_input_matches_prompt_input(pipe, packs):
    embeds, negative = pipe.encode_prompt([RED], "cpu", 1, True)
    with guard(pipe, [packs[0]]) as g:
        by_text = g([RED], generator=_gen(), erase=["red"], **KW).images
        by_embeds = g(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=_gen(), erase=["red"],
                      **KW).images
        assert g.last_report.flagged["red"] == [1]
    torch.testing.assert_close(by_text, by_embeds)


def test_detach_restores_exact_behaviour(pipe, packs, baseline):
    processors = dict(pipe.unet.attn_processors)
    g = guard(pipe, list(packs))
    assert pipe.unet._diffusers_hook.get_hook(HOOK_NAME) is not None
    assert any(type(p).__name__ == "_CaptureProcessor" for p in pipe.unet.attn_processors.values())
    g.detach()
    assert pipe.unet._diffusers_hook.get_hook(HOOK_NAME) is None
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
    assert torch.equal(pipe([RED, BLUE], generator=_gen(), **KW).images, baseline)
    with pytest.raises(ErasekitError, match="detached"):
        g([RED], erase=["red"], **KW)


def test_second_guard_on_same_pipeline_refused(pipe, packs):
    with guard(pipe, [packs[0]]):
        with pytest.raises(ErasekitError, match="already guarded"):
            guard(pipe, [packs[0]])


def test_erasing_block_guards_direct_module_calls(pipe, packs):
    embeds = encode_conditioning(pipe, [RED, BLUE])
    sample, t = torch.randn(2, 4, 4, 4, generator=_gen()), torch.tensor(500)
    with guard(pipe, [packs[0]]) as g:
        plain = pipe.unet(sample, t, encoder_hidden_states=embeds).sample
        with g.erasing(["red"]) as state:
            guarded = pipe.unet(sample, t, encoder_hidden_states=embeds).sample
        assert state.report.flagged["red"] == [0]
        after = pipe.unet(sample, t, encoder_hidden_states=embeds).sample
    assert torch.equal(plain, after)
    assert not torch.equal(guarded[0], plain[0]) and torch.equal(guarded[1], plain[1])


def test_irece_perturbs_only_toggled_rows_and_chains_user_callback(pipe, packs, baseline):
    calls = []

    def user_callback(p, step, timestep, tensors):
        calls.append(step)
        return {}

    with guard(pipe, [packs[1]]) as g:
        out = g([RED, BLUE], generator=_gen(), erase=[["red"], []], callback_on_step_end=user_callback, **KW).images
        masked = g.last_report.irece_masked_fraction["red"]
    assert calls == [0, 1]
    assert masked and max(masked) > 0
    assert not torch.equal(out[0], baseline[0]) and torch.equal(out[1], baseline[1])


def _with(pack: ConceptPack, **hp) -> ConceptPack:
    import dataclasses

    new = dataclasses.replace(pack, hyperparameters={**pack.hyperparameters, **hp}, source=None)
    new.validate()
    return new


@pytest.mark.parametrize("cut, strength, changed", [("mask", 0.0, True), ("image", 0.0, True), ("none", 0.0, False),
                                                    ("none", 0.9, True)])
def test_irece_cut_and_renoise_act_only_on_latched_rows(pipe, packs, baseline, cut, strength, changed):
    pack = _with(packs[1], cut=cut, strength=strength, decide_start=0.0, decide_end=0.5)  # latch at step 0
    with guard(pipe, [pack]) as g:
        out = g([RED, BLUE], generator=_gen(), erase=[["red"], []], **KW).images
        assert g.last_report.irece_latched["red"] == [0]
    assert torch.equal(out[1], baseline[1])  # the row that does not erase red is untouched
    assert torch.equal(out[0], baseline[0]) != changed


def test_irece_calibrated_gate_stays_off_for_unlatched_images(pipe, packs, baseline):
    pack = _with(packs[1], threshold=None, gate_fpr=0.0)
    impossible = dataclasses_replace_tensor(pack, "gate_threshold", torch.full_like(pack.tensors["gate_threshold"], 1e9))
    with guard(pipe, [impossible]) as g:
        out = g([RED, BLUE], generator=_gen(), erase=["red"], **KW).images
        assert g.last_report.irece_latched.get("red", []) == []
        assert g.last_report.irece_gate["red"]  # the gate was evaluated ...
    assert torch.equal(out, baseline)  # ... and, not firing, left every image bit-identical


def dataclasses_replace_tensor(pack: ConceptPack, name: str, value: torch.Tensor) -> ConceptPack:
    import dataclasses

    return dataclasses.replace(pack, tensors={**pack.tensors, name: value}, source=None)


def test_folded_probe_matches_the_probe_on_queries(pipe, packs):
    from erasekit.integrations.diffusers import cross_attention_inputs, cross_attention_queries
    from erasekit.steering import irece

    with guard(pipe, [packs[1]]) as g:
        concept = g._irece["red"]
        name = sorted(concept.layers)[0]
        attn = dict(pipe.unet.named_modules())[name.removesuffix(".processor")]
        hidden = torch.randn(4, 16, attn.to_q.in_features)
        folded, shift = concept.fold(name, attn)
        for t in range(folded.shape[0]):
            direct = irece.probe_logits(cross_attention_queries(attn, hidden, 2), concept.probes[name][t],
                                        torch.zeros(1))
            torch.testing.assert_close(cross_attention_inputs(attn, hidden, 2) @ folded[t] + shift[t], direct,
                                       rtol=1e-4, atol=1e-4)


def test_mandatory_concepts_always_on_and_cannot_be_disabled(pipe, packs, baseline):
    with guard(pipe, [packs[0]], mandatory=["red"]) as g:
        out = g([RED, BLUE], generator=_gen(), **KW).images
        assert not torch.equal(out[0], baseline[0])
        with pytest.raises(PolicyError, match="mandatory"):
            g([RED], erase=["-red"], **KW)


@pytest.mark.parametrize("erase, match", [
    (["blue"], "unknown concept"),
    ([["red"], ["red"], ["red"]], "per-prompt lists"),
    (["Red!"], "invalid concept name"),
    (7, "expected a list"),
])
def test_bad_erase_values(pipe, packs, erase, match):
    with guard(pipe, [packs[0]]) as g:
        with pytest.raises(ErasekitError, match=match):
            g([RED, BLUE], erase=erase, **KW)
        assert g._current() is None
        g([RED], erase=["red"], **KW)  # the guard still works after a refused request


def test_pack_for_another_text_encoder_refused_nothing_attached(packs):
    other = build_tiny_sd_pipeline(1)
    with pytest.raises(PackError, match="embedding_sha256"):
        guard(other, [packs[0]])
    registry = getattr(other.unet, "_diffusers_hook", None)
    assert registry is None or registry.get_hook(HOOK_NAME) is None


def test_mismatched_embedding_shapes(pipe, packs):
    wrong = torch.randn(1, 10, 32)
    with guard(pipe, [packs[0]]) as g:
        with pytest.raises(ErasekitError, match=r"reads \[N, 77, 32\]"):
            g(prompt_embeds=wrong, negative_prompt_embeds=wrong, erase=["red"], **KW)
        assert g._current() is None
    wide = build_tiny_sd_pipeline(0, text_hidden_size=16)
    with pytest.raises(PackError):
        guard(wide, [packs[0]])
    assert wide.unet._diffusers_hook.get_hook(HOOK_NAME) is None if hasattr(wide.unet, "_diffusers_hook") else True


def test_saved_packs_load_into_guard(tmp_path, pipe, packs):
    paths = [p.save_pretrained(tmp_path / p.method) for p in packs]
    g = DiffusersGuard(pipe, packs=paths)
    try:
        assert g.concepts == frozenset({"red"})
        assert isinstance(g.packs[0], ConceptPack)
    finally:
        g.detach()


def test_concurrent_calls_on_separate_pipelines(packs):
    pipes = [build_tiny_sd_pipeline(0), build_tiny_sd_pipeline(0)]
    expected = pipes[0]([RED], generator=_gen(), **KW).images
    guards = [guard(p, [packs[0]]) for p in pipes]
    with guards[0]:
        reference = guards[0]([RED], generator=_gen(), erase=["red"], **KW).images
    results: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        erase = ["red"] if i == 0 else []
        results[i] = guards[i]([RED], generator=_gen(), erase=erase, **KW).images

    guards[0].attach()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for g in guards:
        g.detach()
    assert torch.equal(results[0], reference)
    assert torch.equal(results[1], expected)


def test_no_state_leaks_between_calls(pipe, packs, baseline):
    with guard(pipe, list(packs)) as g:
        g([RED, BLUE], generator=_gen(), erase=["red"], **KW)
        after = g([RED, BLUE], generator=_gen(), **KW).images
        assert g.last_report.flagged == {} and g._current() is None
    assert torch.equal(after, baseline)


def test_policy_file_with_a_folder_of_packs_per_concept(tmp_path, pipe, packs):
    for p in packs:
        p.save_pretrained(tmp_path / "packs" / "red" / p.method)
    (tmp_path / "policy.yaml").write_text("concepts:\n  red: {pack: packs/red, mandatory: true}\n")
    with guard(pipe, policy=tmp_path / "policy.yaml") as g:
        assert sorted(p.method for p in g.packs) == ["cgce", "irece"]
        assert g.policy.mandatory == frozenset({"red"})
    (tmp_path / "policy.yaml").write_text("concepts:\n  blue: {pack: packs/red}\n")
    with pytest.raises(PolicyError, match="holds concept 'red'"):
        guard(pipe, policy=tmp_path / "policy.yaml")
    assert pipe.unet._diffusers_hook.get_hook(HOOK_NAME) is None


def test_erasing_block_is_invisible_to_other_threads(pipe, packs):
    embeds = encode_conditioning(pipe, [RED])
    sample, t = torch.randn(1, 4, 4, 4, generator=_gen()), torch.tensor(500)
    plain = pipe.unet(sample, t, encoder_hidden_states=embeds).sample
    seen: list[torch.Tensor] = []
    with guard(pipe, [packs[0]]) as g, g.erasing(["red"]):
        th = threading.Thread(target=lambda: seen.append(pipe.unet(sample, t, encoder_hidden_states=embeds).sample))
        th.start()
        th.join()
        assert not torch.equal(pipe.unet(sample, t, encoder_hidden_states=embeds).sample, plain)
    assert torch.equal(seen[0], plain)
