"""Fast tests of the vLLM plugin's pieces, without starting an engine."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from erasekit import Concept, ModelFingerprint, PolicyError  # noqa: E402
from erasekit.integrations import vllm_config as cfg  # noqa: E402
from erasekit.integrations import vllm_plugin  # noqa: E402
from erasekit.integrations.vllm_runtime import EngineEraser, EraseLogitsProcessor  # noqa: E402
from erasekit.steering.add_vector import make_add_vector_pack  # noqa: E402
from erasekit.steering.residual import AddVector, Phase  # noqa: E402
from erasekit.testing.vllm_edit_fixtures import (  # noqa: E402
    PLAN_CASES,
    bits,
    fake_runner,
    method_edits,
    reference_edit,
)

FP = ModelFingerprint("LlamaForCausalLM", 8, 3, 32, "ab" * 32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_units")
    concepts = {}
    for i, (name, mandatory) in enumerate([("alpha", False), ("beta", False), ("always", True)]):
        vec = torch.full((8,), float(i + 1))
        pack = make_add_vector_pack(Concept(name, forget=("x",), retain=("y",)), FP, {1: vec})
        path = pack.save_pretrained(root / name)
        concepts[name] = {"pack": str(path), "mandatory": mandatory}
    policy = root / "policy.json"
    policy.write_text(json.dumps({"concepts": concepts, "max_requested": 2}))
    return SimpleNamespace(root=root, policy=policy)


def _vllm_config(section):
    return SimpleNamespace(additional_config={cfg.CONFIG_KEY: section} if section is not None else {})


def test_register_is_idempotent_and_patches_once():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.input_processor import InputProcessor

    vllm_plugin.register()
    first = (EngineArgs.create_engine_config, InputProcessor.process_inputs)
    vllm_plugin.register()
    vllm_plugin._registered = False  # force the patch functions to run again
    vllm_plugin.register()
    assert (EngineArgs.create_engine_config, InputProcessor.process_inputs) == first
    assert getattr(first[0], "_erasekit", False) and getattr(first[1], "_erasekit", False)


def test_section_sources_and_errors(world, monkeypatch):
    monkeypatch.delenv(cfg.ENV_VAR, raising=False)
    assert cfg.section_from({}) is None and cfg.section_from_env() is None
    monkeypatch.setenv(cfg.ENV_VAR, str(world.policy))
    assert cfg.section_from_env() == {"policy": str(world.policy.resolve())}
    with pytest.raises(PolicyError, match="unknown key"):
        cfg.section_from({"erasekit": {"policy": "p", "packs": []}})
    with pytest.raises(PolicyError, match="missing"):
        cfg.section_from({"erasekit": {}})
    config = cfg.prepare_section({"policy": str(world.policy)})
    assert len(config.digest) == 64 and config.section["digest"] == config.digest
    with pytest.raises(PolicyError, match="changed on disk"):
        cfg.prepare_section({"policy": str(world.policy), "digest": "0" * 64})


def test_pack_for_another_model_is_refused(world):
    config = cfg.prepare_section({"policy": str(world.policy)})
    other = ModelFingerprint("LlamaForCausalLM", 8, 3, 32, "cd" * 32)
    with pytest.raises(Exception, match="embedding_sha256"):
        cfg.check_packs(config.packs, other, has_hash=True)
    cfg.check_packs(config.packs, other, has_hash=False)  # a rank without the embedding rows skips the hash only
    with pytest.raises(Exception, match="hidden_size"):
        cfg.check_packs(config.packs, ModelFingerprint("LlamaForCausalLM", 16, 3, 32, ""), has_hash=False)


def test_salt_separates_concept_sets():
    d = "f" * 64
    assert cfg.salt_for(frozenset(), d, None) is None
    assert cfg.salt_for(frozenset(), d, "user") == "user"
    a = cfg.salt_for(frozenset({"alpha"}), d, None)
    assert a.startswith(cfg.SALT_PREFIX)
    assert a != cfg.salt_for(frozenset({"alpha", "beta"}), d, None)
    assert a != cfg.salt_for(frozenset({"alpha"}), "e" * 64, None)
    assert cfg.salt_for(frozenset({"alpha"}), d, "user").endswith("|user")


def _lp(world):
    config = cfg.prepare_section({"policy": str(world.policy)})
    return EraseLogitsProcessor(_vllm_config(config.section), torch.device("cpu"), False)


def _sp(erase=None):
    return SamplingParams(extra_args={"erase": erase} if erase is not None else None)


def test_validate_params_rejects_bad_toggles_with_parameter_name(world):
    from vllm.exceptions import VLLMValidationError

    EraseLogitsProcessor.validate_params(_sp(["alpha"]))
    for bad in (["Alpha!"], [1], "[not json", {"alpha": "yes"}):
        with pytest.raises(VLLMValidationError) as info:
            EraseLogitsProcessor.validate_params(_sp(bad))
        assert info.value.parameter == "erase"


def test_carrier_tracks_slots_through_add_remove_move(world):
    lp = _lp(world)
    assert lp.is_argmax_invariant() is False
    lp.update_state(BatchUpdate(3, removed=[], added=[(0, _sp(), [1], []), (1, _sp(["alpha"]), [1], []),
                                                     (2, _sp("beta"), [1], [])], moved=[]))
    assert lp.slots == {0: {"always"}, 1: {"always", "alpha"}, 2: {"always", "beta"}}
    lp.update_state(BatchUpdate(3, removed=[], added=[], moved=[(1, 2, MoveDirectionality.SWAP)]))
    assert lp.slots[1] == {"always", "beta"} and lp.slots[2] == {"always", "alpha"}
    lp.update_state(BatchUpdate(2, removed=[0], added=[], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert lp.slots == {0: {"always", "alpha"}, 1: {"always", "beta"}}
    lp.update_state(None)  # no change this step
    assert len(lp.slots) == 2
    # A forged router key cannot switch off a concept that has no router.
    lp.routed = frozenset()
    forged = SamplingParams(extra_args={"erase": ["alpha"], cfg.ROUTED_OUT_KEY: ["always", "alpha"]})
    lp.update_state(BatchUpdate(3, removed=[], added=[(2, forged, [1], [])], moved=[]))
    assert lp.slots[2] == {"always", "alpha"}
    logits = torch.zeros(3, 5)
    assert lp.apply(logits) is logits and bool((logits == 0).all())


def test_worker_never_raises_and_refuses_per_on_error(world):
    lp = _lp(world)
    bad = SamplingParams(extra_args={"erase": ["nope"]})  # cannot pass admission; simulate a bug
    lp.update_state(BatchUpdate(2, removed=[], added=[(0, bad, [1], []), (1, _sp(), [1], [])], moved=[]))
    assert lp.errors == 1 and 0 in lp.refused and 1 in lp.slots
    logits = torch.zeros(2, 5)
    out = lp.apply(logits)
    assert torch.isinf(out[0]).sum() == 4 and bool((out[1] == 0).all())
    lp.update_state(BatchUpdate(1, removed=[0], added=[], moved=[]))
    assert not lp.refused


def test_eraser_edits_only_active_rows_with_phase_split():
    # slot 0: decode (1 row); slot 1: prefill of 3 rows; slot 2: mixed chunk (2 prompt + 1 output rows)
    runner = fake_runner([1, 3, 3], computed=[5, 0, 3], prompt=[4, 3, 5])
    carrier = SimpleNamespace(slots={1: frozenset({"a"}), 2: frozenset({"a", "p"})}, refused={}, errors=0, version=0,
                              fail_slots=lambda s: None)
    edits = {"a": AddVector("a", {0: torch.ones(4)}),
             "p": AddVector("p", {0: torch.full((4,), 10.0)}, frozenset({Phase.PREFILL}))}
    eraser = EngineEraser(runner, carrier, edits, [0])
    hidden = torch.randn(9, 4)  # 7 real rows + 2 padding rows
    residual = torch.randn(9, 4)
    before = hidden + residual
    h, r = hidden.clone(), residual.clone()
    torch.ops.erasekit.vllm_edit_(h, r, 0, eraser.key)
    after = h + r
    expected = before.clone()
    expected[1:7] += 1.0  # concept a on slots 1 and 2, both phases
    expected[4:6] += 10.0  # concept p: prefill rows of slot 2 only
    torch.testing.assert_close(after, expected)
    # untouched rows are bit-identical, in both tensors
    assert torch.equal(h[0], hidden[0]) and torch.equal(r[0], residual[0])
    assert torch.equal(h[7:], hidden[7:]) and torch.equal(r[7:], residual[7:])


def test_benign_step_writes_nothing():
    runner = fake_runner([2, 2], computed=[0, 0], prompt=[2, 2])
    carrier = SimpleNamespace(slots={}, refused={}, errors=0, version=0, fail_slots=lambda s: None)
    eraser = EngineEraser(runner, carrier, {"a": AddVector("a", {0: torch.ones(4)})}, [0])
    h, r = torch.randn(4, 4), torch.randn(4, 4)
    h0, r0 = h.clone(), r.clone()
    torch.ops.erasekit.vllm_edit_(h, r, 0, eraser.key)
    assert torch.equal(h, h0) and torch.equal(r, r0) and eraser.steps_edited == 0


def test_failing_edit_is_counted_not_raised():
    class Boom(AddVector):
        def edit(self, *a, **k):
            raise RuntimeError("boom")

    failed = []
    runner = fake_runner([2], computed=[0], prompt=[2])
    carrier = SimpleNamespace(slots={0: frozenset({"a"})}, refused={}, errors=0, version=0, fail_slots=failed.append)
    eraser = EngineEraser(runner, carrier, {"a": Boom("a", {0: torch.ones(4)})}, [0])
    h, r = torch.randn(2, 4), torch.randn(2, 4)
    stream = h + r
    torch.ops.erasekit.vllm_edit_(h, r, 0, eraser.key)
    assert failed == [[0]]
    assert torch.equal(h + r, stream)  # the failed rows are left unedited, never half-written


def test_op_survives_torch_compile():
    """The point of the opaque op: a compiled graph keeps calling it, so live state is honoured.

    A plain Python hook would be traced once with an empty slot table and never edit again;
    this test fails if the edit is baked out of the compiled graph.
    """
    runner = fake_runner([3], computed=[0], prompt=[3])
    carrier = SimpleNamespace(slots={}, refused={}, errors=0, version=0, fail_slots=lambda s: None)
    eraser = EngineEraser(runner, carrier, {"a": AddVector("a", {0: torch.ones(4)})}, [0])

    def layer(h, r):
        h = h * 1.0
        r = r * 1.0
        torch.ops.erasekit.vllm_edit_(h, r, 0, eraser.key)
        return h + r

    compiled = torch.compile(layer, fullgraph=True, backend="eager", dynamic=False)
    h, r = torch.zeros(3, 4), torch.zeros(3, 4)
    assert torch.equal(compiled(h, r), torch.zeros(3, 4))  # traced while nothing was active
    carrier.slots[0] = frozenset({"a"})
    assert torch.equal(compiled(h, r), torch.ones(3, 4))  # same compiled graph now edits
    carrier.slots.clear()
    assert torch.equal(compiled(h, r), torch.zeros(3, 4))


def test_decode_plan_is_reused_until_the_batch_changes():
    runner = fake_runner([1, 1], computed=[5, 5], prompt=[3, 3])  # both decoding
    carrier = SimpleNamespace(slots={0: frozenset({"a"})}, refused={}, errors=0, version=0, fail_slots=lambda s: None)
    eraser = EngineEraser(runner, carrier, {"a": AddVector("a", {0: torch.ones(2)})}, [0])
    h, r = torch.zeros(2, 2), torch.zeros(2, 2)
    torch.ops.erasekit.vllm_edit_(h, r, 0, eraser.key)
    first = eraser.plan
    assert torch.equal(h + r, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    torch.ops.erasekit.vllm_edit_(h, r, 0, eraser.key)
    assert eraser.plan is first  # steady decode: no rebuild
    carrier.slots = {1: frozenset({"a"})}  # a batch update moved the concept to slot 1
    carrier.version += 1
    h, r = torch.zeros(2, 2), torch.zeros(2, 2)
    torch.ops.erasekit.vllm_edit_(h, r, 0, eraser.key)
    assert eraser.plan is not first
    assert torch.equal(h + r, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))


# -- the fused per-layer plan must reproduce the one-group-at-a-time semantics bit for bit -----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked_max", ["default", "gather"])
@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_fused_layer_plan_equals_group_by_group(case, masked_max, dtype, monkeypatch):
    """Every plan mode reproduces the one-group-at-a-time algorithm bit for bit, and never writes
    rows outside the block it works on. ``gather`` forces the gathered path for unions with gaps."""
    from erasekit.integrations import vllm_edit as rt

    if masked_max == "gather":
        monkeypatch.setattr(rt, "_MASKED_MAX_ELEMS", 0)
        monkeypatch.setattr(rt, "_MASKED_MAX_ROWS", 0)
    d = 16
    lengths, computed, prompt, slots = PLAN_CASES[case]
    edits = method_edits(d, dtype)
    runner = fake_runner(lengths, computed, prompt)
    carrier = SimpleNamespace(slots=slots, refused={}, errors=0, version=0, fail_slots=lambda s: None)
    eraser = EngineEraser(runner, carrier, edits, [0, 1])
    n = sum(lengths) + 3  # padding rows after the real ones
    g = torch.Generator().manual_seed(1)
    hidden, residual = torch.randn(n, d, generator=g).to(dtype), torch.randn(n, d, generator=g).to(dtype)
    h, r = hidden.clone(), residual.clone()
    want_h, want_r = hidden, residual
    for layer in (0, 1):
        torch.ops.erasekit.vllm_edit_(h, r, layer, eraser.key)
        want_h, want_r = reference_edit(edits, slots, lengths, computed, prompt, layer, want_h, want_r)
        assert torch.equal(bits(h), bits(want_h)) and torch.equal(bits(r), bits(want_r)), f"layer {layer}"
    assert eraser.steps_edited == 1 and carrier.errors == 0 and eraser.plans_built == 1
    edited = set(np.flatnonzero((want_h != hidden).any(1).numpy()).tolist())
    assert edited and not edited & set(range(sum(lengths), n))  # something was edited, never padding
    # the modes this case is there to cover
    modes = {lp.mode for lp in eraser.plan.layers.values()}
    contiguous = case in ("decode_all", "long_contiguous")
    assert modes == {rt._BLOCK} if contiguous else modes == {rt._GATHER if masked_max == "gather" else rt._MASKED}
    if case == "decode_half_constant":
        assert all(lp.adds is not None for lp in eraser.plan.layers.values())


def test_plan_is_kept_when_only_untoggled_requests_change():
    """An untoggled request joining, leaving or moving does not rebuild the plan while the toggled
    requests keep their rows; a toggled request moving (a new layout) does, and a layout seen
    before is recalled, not rebuilt."""
    runner = fake_runner([1, 1, 1, 1], computed=[5] * 4, prompt=[3] * 4)
    carrier = SimpleNamespace(slots={0: frozenset({"a"}), 2: frozenset({"a"})}, refused={}, errors=0, version=0,
                              fail_slots=lambda s: None)
    eraser = EngineEraser(runner, carrier, {"a": AddVector("a", {0: torch.ones(2)})}, [0])

    def step(num_rows):
        h, r = torch.zeros(num_rows, 2), torch.zeros(num_rows, 2)
        torch.ops.erasekit.vllm_edit_(h, r, 0, eraser.key)
        return (h + r)[:, 0].tolist()

    assert step(4) == [1, 0, 1, 0] and eraser.plans_built == 1
    runner.input_batch.num_reqs = 3  # untoggled slot 3 left
    carrier.version += 1
    assert step(3) == [1, 0, 1] and (eraser.plans_checked, eraser.plans_built) == (2, 1)
    runner.input_batch.num_reqs = 5  # an untoggled request joined at slot 3 and slot 4
    runner.query_start_loc.np[:6] = np.arange(6)
    runner.input_batch.num_computed_tokens_cpu = np.array([5] * 5)
    runner.input_batch.num_prompt_tokens = np.array([3] * 5)
    carrier.version += 1
    assert step(5) == [1, 0, 1, 0, 0] and (eraser.plans_checked, eraser.plans_built) == (3, 1)
    carrier.slots = {1: frozenset({"a"}), 2: frozenset({"a"})}  # the toggled request of slot 0 moved to 1
    carrier.version += 1
    assert step(5) == [0, 1, 1, 0, 0] and (eraser.plans_checked, eraser.plans_built) == (4, 2)
    assert step(5) == [0, 1, 1, 0, 0] and eraser.plans_checked == 4  # steady decode: not even checked
    carrier.slots = {0: frozenset({"a"}), 2: frozenset({"a"})}  # back to the first layout: recalled
    carrier.version += 1
    assert step(5) == [1, 0, 1, 0, 0] and (eraser.plans_checked, eraser.plans_built) == (5, 2)
    carrier.requests_guarded = 2
    stats = eraser.stats()
    assert (stats["plans_checked"], stats["plans_built"], stats["plans_recalled"]) == (5, 2, 1)


def test_plan_follows_concepts_and_phase_when_rows_stay():
    """Same slots, same rows: a new request with other concepts in the slot, or a chunk moving from
    prompt to output tokens, must still change what is edited (the plan's key covers both)."""
    runner = fake_runner([2, 2], computed=[0, 0], prompt=[4, 4])  # two prompt chunks of 2 rows
    carrier = SimpleNamespace(slots={0: frozenset({"a"}), 1: frozenset({"p"})}, refused={}, errors=0, version=0,
                              fail_slots=lambda s: None)
    edits = {"a": AddVector("a", {0: torch.ones(1)}),
             "p": AddVector("p", {0: torch.full((1,), 10.0)}, frozenset({Phase.PREFILL}))}
    eraser = EngineEraser(runner, carrier, edits, [0])

    def step():
        h, r = torch.zeros(4, 1), torch.zeros(4, 1)
        torch.ops.erasekit.vllm_edit_(h, r, 0, eraser.key)
        return (h + r)[:, 0].tolist()

    assert step() == [1, 1, 10, 10]
    runner.input_batch.num_computed_tokens_cpu = np.array([3, 3])  # 1 prompt row, then 1 output row each
    assert step() == [1, 1, 10, 0]
    carrier.slots = {0: frozenset({"p"}), 1: frozenset({"p"})}  # slot 0 now holds another request
    carrier.version += 1
    assert step() == [10, 0, 10, 0]
    assert eraser.plans_built == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_layer_norm_sees_untoggled_rows_exactly_as_stock(dtype):
    """The masked in-place path writes every row of its block, untoggled ones included
    (``hidden += residual * 0``, ``residual *= 1``). Through vLLM's own fused add+RMSNorm (the
    native implementation vLLM-CPU runs) untoggled rows must come out bit-identical to a step
    without erasekit, toggled rows equal to normalising the edited stream.

    Why masked and not "``hidden += residual; residual = 0`` for the whole batch": that variant is
    exact in fp32, but in bf16 the native kernel normalises the *unrounded* fp32 sum
    ``h + r``, so feeding it the bf16-rounded sum changes untoggled rows (checked below)."""
    from vllm import ir

    norm = ir.ops.fused_add_rms_norm.impls["native"].impl_fn
    d, rows = 32, 16
    toggled = {i: frozenset("a") for i in range(1, rows, 2)}
    g = torch.Generator().manual_seed(3)
    edits = {"a": AddVector("a", {0: torch.randn(d, generator=g).to(dtype)})}
    runner = fake_runner([1] * rows, [9] * rows, [4] * rows)
    carrier = SimpleNamespace(slots=toggled, refused={}, errors=0, version=0, fail_slots=lambda s: None)
    eraser = EngineEraser(runner, carrier, edits, [0])
    hidden, residual = torch.randn(rows, d, generator=g).to(dtype), torch.randn(rows, d, generator=g).to(dtype)
    weight = (torch.rand(d, generator=g) + 0.5).to(dtype)
    h, r = hidden.clone(), residual.clone()
    torch.ops.erasekit.vllm_edit_(h, r, 0, eraser.key)
    assert eraser.plan.layers[0].mode != 2  # not the gathered path: this test is about the in-place one
    out, res = norm(h.clone(), r.clone(), weight, 1e-6)
    stock_out, stock_res = norm(hidden.clone(), residual.clone(), weight, 1e-6)
    plain = list(range(0, rows, 2))
    assert torch.equal(bits(out[plain]), bits(stock_out[plain])) and torch.equal(bits(res[plain]), bits(stock_res[plain]))
    assert torch.equal(bits(h[plain]), bits(hidden[plain])) and torch.equal(bits(r[plain]), bits(residual[plain]))
    odd = list(range(1, rows, 2))
    edited = (hidden[odd] + residual[odd]) + edits["a"].vectors[0]
    want_out, want_res = norm(edited, torch.zeros_like(edited), weight, 1e-6)
    assert torch.equal(bits(out[odd]), bits(want_out)) and torch.equal(bits(res[odd]), bits(want_res))
    naive_out, _ = norm(hidden + residual, torch.zeros_like(residual), weight, 1e-6)
    assert torch.equal(naive_out[plain], stock_out[plain]) == (dtype == torch.float32)


class _Block(torch.nn.Module):
    pass


class _Stack(torch.nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_Block() for _ in range(depth))


class _FakeVLM(torch.nn.Module):
    """A vision tower and a text model of the same depth, like a small VLM can have."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.vision_tower = torch.nn.Module()
        self.vision_tower.encoder = _Stack(depth)
        self.text_model = torch.nn.Module()
        self.text_model.model = _Stack(depth)

    def get_language_model(self) -> torch.nn.Module:
        return self.text_model


def test_decoder_layers_of_a_multimodal_model_come_from_its_language_model():
    from erasekit.integrations.vllm_runtime import find_decoder_layers

    vlm = _FakeVLM(4)
    name, layers = find_decoder_layers(vlm, 4)
    assert name == "text_model.model.layers"
    assert layers is vlm.text_model.model.layers
    # without the language-model hint the two equal-depth lists are ambiguous: refuse, never guess
    plain = _FakeVLM(4)
    plain.get_language_model = None
    with pytest.raises(Exception, match="cannot find one decoder-layer list"):
        find_decoder_layers(plain, 4)


def test_edit_module_imports_without_vllm():
    """The op, the plan and EngineEraser must be importable on a machine with torch but no vLLM."""
    import subprocess
    import sys

    code = ("import sys; import erasekit.integrations.vllm_edit as e; "
            "bad = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')); "
            "assert not bad, bad; assert hasattr(e.torch.ops.erasekit, 'vllm_edit_')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_output_token_ids_released_only_when_the_carrier_is_the_only_custom_processor():
    """Loading a custom logits processor makes vLLM hand it every request's output tokens each step
    (under async scheduling: a host sync and a Python loop per step); the carrier does not read
    them, so install() clears the flag, but never when another custom processor might."""
    from erasekit.integrations.vllm_runtime import release_output_token_ids

    carrier = object()
    builtin = type("MinPLogitsProcessor", (), {"__module__": "vllm.v1.sample.logits_processor.builtin"})()
    other = type("UserProcessor", (), {"__module__": "user_pkg.procs"})()

    def batch(*procs):
        return SimpleNamespace(logitsprocs=SimpleNamespace(all=iter(procs)), logitsprocs_need_output_token_ids=True)

    alone = batch(builtin, carrier)
    assert release_output_token_ids(alone, carrier) and alone.logitsprocs_need_output_token_ids is False
    shared = batch(builtin, carrier, other)
    assert not release_output_token_ids(shared, carrier) and shared.logitsprocs_need_output_token_ids is True


def test_carrier_recalls_a_readded_request_instead_of_counting_it_again(world):
    """Pipeline parallelism takes every request out of a rank's batch and puts it back each step.
    The carrier recalls the request (same params object): its concepts and refusal come back, it is
    not guarded or resumed again, and the eraser keeps its plan. A preempted request that comes back
    to recompute its tokens still counts as resumed."""
    lp = _lp(world)
    p0, p1, p2 = _sp(), _sp(["alpha"]), _sp(["beta"])
    runner = fake_runner([1, 1, 1], computed=[4, 4, 4], prompt=[4, 4, 4])
    lp.batch_of = lambda: runner.input_batch
    lp.update_state(BatchUpdate(3, removed=[], added=[(0, p0, [1], []), (1, p1, [1], []), (2, p2, [1], [])], moved=[]))
    assert lp.requests_guarded == 3 and lp.requests_resumed == 0
    edits = {n: AddVector(n, {0: torch.full((8,), float(i + 1))}) for i, n in enumerate(("alpha", "always", "beta"))}
    eraser = EngineEraser(runner, lp, edits, [0])
    h, r = torch.zeros(3, 8), torch.zeros(3, 8)
    torch.ops.erasekit.vllm_edit_(h, r, 0, eraser.key)
    assert eraser.plans_built == 1
    lp.fail_slots([2])  # slot 2's edit failed: refused (on_error=refuse), with no eos id known
    assert lp.refused == {2: None}
    torch.ops.erasekit.vllm_edit_(h, r, 0, eraser.key)  # the refused slot leaves the plan: a new layout
    assert eraser.plans_built == 2
    slots_before = dict(lp.slots)
    outputs = {0: [7], 1: [7], 2: [7]}  # one token generated; 4 prompt tokens computed, the new one not yet
    runner.input_batch.num_computed_tokens_cpu[:] = 4
    for _ in range(3):  # a rank's batch under PP=2: out one step, back the next, same slots
        lp.update_state(BatchUpdate(0, removed=[0, 1, 2], added=[], moved=[]))
        assert lp.slots == {} and lp.refused == {}
        lp.update_state(BatchUpdate(3, removed=[], added=[(i, p, [1], outputs[i]) for i, p in enumerate((p0, p1, p2))],
                                    moved=[]))
        assert lp.slots == slots_before and lp.refused == {2: None}
        torch.ops.erasekit.vllm_edit_(h, r, 0, eraser.key)
    assert (lp.requests_guarded, lp.requests_resumed, lp.requests_readded) == (3, 0, 9)
    assert eraser.plans_built == 2 and lp.errors == 1  # every re-add found the plan it had
    # back in other slots, then moved: the recalled concepts and the refusal follow the request
    lp.update_state(BatchUpdate(0, removed=[0, 1, 2], added=[], moved=[]))
    lp.update_state(BatchUpdate(3, removed=[], added=[(0, p2, [1], [7]), (1, p0, [1], [7]), (2, p1, [1], [7])],
                                moved=[(0, 2, MoveDirectionality.SWAP)]))
    assert lp.slots == {2: slots_before[2], 1: slots_before[0], 0: slots_before[1]} and lp.refused == {2: None}
    assert lp.requests_guarded == 3 and lp.requests_resumed == 0
    # preempted, then resumed with recompute (nothing of its 4 + 1 tokens computed): counted as resumed
    lp.update_state(BatchUpdate(2, removed=[0], added=[], moved=[]))
    runner.input_batch.num_computed_tokens_cpu[0] = 0
    lp.update_state(BatchUpdate(3, removed=[], added=[(0, p1, [1], [7])], moved=[]))
    assert lp.slots[0] == slots_before[1] and lp.requests_resumed == 1 and lp.requests_guarded == 3
