"""The plugin keeps ``erasekit::vllm_edit_`` out of CUDA graphs (real vLLM config objects, CPU).

Every config here is built by vLLM itself: ``EngineArgs(...).create_engine_config()`` on the
tiny random Llama, which is the code path ``LLM(...)`` and ``vllm serve`` take in the front end
(erasekit's patch included). No engine is started.

CPU vLLM never captures CUDA graphs, so the ``gpu_like`` fixture monkeypatches the CPU
platform class, and only it, in two places (the unavoidable minimum, both restored after each
test):

* ``support_static_graph_mode`` -> True, as ``CudaPlatform`` returns (vLLM then keeps its
  default ``FULL_AND_PIECEWISE`` instead of forcing ``NONE``);
* ``check_and_update_config`` -> a no-op: the CPU platform's hook switches ``VLLM_COMPILE`` to
  ``DYNAMO_TRACE_ONCE`` (no piecewise splitting), while ``CudaPlatform.check_and_update_config``
  in vLLM 0.32 does not touch ``compilation_config`` at all (it sets the worker class and two
  unrelated scheduler/offload options).

Everything else (optimization-level defaults, ``set_splitting_ops_for_v1``, the hash) is
vLLM's own code. What this cannot show is a real capture on a GPU: see docs/vllm.md.
"""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

from erasekit import PolicyError  # noqa: E402
from erasekit.integrations import vllm_config as cfg  # noqa: E402
from erasekit.integrations import vllm_plugin  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from erasekit.integrations.vllm_testing import write_world

    return write_world(tmp_path_factory.mktemp("vllm_cudagraph"))


@pytest.fixture(autouse=True)
def _plugin(monkeypatch):
    vllm_plugin.register()
    for var in ("VLLM_USE_BREAKABLE_CUDAGRAPH", "VLLM_USE_V2_MODEL_RUNNER", cfg.ENV_VAR):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def gpu_like(monkeypatch):
    platform = type(current_platform)
    monkeypatch.setattr(platform, "support_static_graph_mode", classmethod(lambda cls: True))
    monkeypatch.setattr(platform, "check_and_update_config", classmethod(lambda cls, vllm_config: None))


def _build(world, *, guarded: bool, **kwargs):
    extra = {"additional_config": {"erasekit": {"policy": str(world.policy_path)}}} if guarded else {}
    return EngineArgs(model=str(world.model_dir), dtype="float32", max_model_len=512, **extra,
                      **kwargs).create_engine_config()


def _refusal(world, **kwargs) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        _build(world, guarded=True, **kwargs)
    return info.value


def test_defaults_become_piecewise_with_the_edit_op_split_out(world, gpu_like, caplog):
    plain = _build(world, guarded=False).compilation_config
    assert plain.mode == CompilationMode.VLLM_COMPILE  # the fixture really gives the GPU resolution
    assert plain.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE and cfg.EDIT_OP not in plain.splitting_ops
    with caplog.at_level(logging.INFO, logger="erasekit.vllm"):
        guarded = _build(world, guarded=True).compilation_config
    assert guarded.cudagraph_mode == CUDAGraphMode.PIECEWISE
    # vLLM's own splitting ops (attention, KV-cache update) are all kept, in order; ours is appended
    assert guarded.splitting_ops == [*plain.splitting_ops, cfg.EDIT_OP]
    assert guarded.splitting_ops_contain_attention() and guarded.is_attention_compiled_piecewise()
    assert guarded.cudagraph_capture_sizes == plain.cudagraph_capture_sizes
    (record,) = [r for r in caplog.records if "FULL_AND_PIECEWISE -> PIECEWISE" in r.getMessage()]
    assert record.levelno == logging.INFO and "frozen" in record.getMessage() and cfg.EDIT_OP in record.getMessage()
    cfg.check_cudagraph_safe(SimpleNamespace(compilation_config=guarded))  # what the worker checks


@pytest.mark.parametrize("mode", ["PIECEWISE", None])
def test_operator_splitting_ops_are_extended_not_replaced(world, gpu_like, mode):
    ops = [*CompilationConfig._attention_ops, "vllm::unified_kv_cache_update", "vllm::some_op"]
    given = {"splitting_ops": ops} | ({"cudagraph_mode": mode} if mode else {})
    cc = _build(world, guarded=True, compilation_config=given).compilation_config
    assert cc.cudagraph_mode == CUDAGraphMode.PIECEWISE and cc.splitting_ops == [*ops, cfg.EDIT_OP]
    already = _build(world, guarded=True, compilation_config={"splitting_ops": [*ops, cfg.EDIT_OP]})
    assert already.compilation_config.splitting_ops == [*ops, cfg.EDIT_OP]  # not twice


def test_vllm_splitter_runs_the_edit_op_outside_the_graph_pieces(world, gpu_like):
    """vLLM's own ``split_graph`` on a Dynamo graph that calls the op between two computations."""
    from vllm.compilation.backends import split_graph

    import erasekit.integrations.vllm_runtime  # noqa: F401  (registers the op)

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def layer(x, r):
        h = x * 2.0
        torch.ops.erasekit.vllm_edit_(h, r, 1, 0)
        return h + r

    torch.compile(layer, backend=capture, fullgraph=True)(torch.ones(3, 4), torch.zeros(3, 4))
    guarded = _build(world, guarded=True).compilation_config.splitting_ops
    _, items = split_graph(copy.deepcopy(graphs[0]), guarded)
    split = [i for i in items if i.is_splitting_graph]
    assert len(items) == 3 and len(split) == 1
    assert "erasekit.vllm_edit_" in split[0].graph.code and "mul" not in split[0].graph.code
    plain = _build(world, guarded=False).compilation_config.splitting_ops
    _, items = split_graph(copy.deepcopy(graphs[0]), plain)
    assert not any(i.is_splitting_graph for i in items)  # without erasekit the op would sit inside a graph


@pytest.mark.parametrize("mode", ["FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"])
def test_explicit_full_graphs_are_refused(world, gpu_like, mode):
    err = _refusal(world, compilation_config={"cudagraph_mode": mode})
    assert err.field == "compilation_config.cudagraph_mode" and f"{mode} (set in the configuration)" in err.problem
    assert "frozen" in err.problem
    assert "PIECEWISE" in err.fix and "enforce_eager=True" in err.fix
    assert _build(world, guarded=False, compilation_config={"cudagraph_mode": mode})  # vLLM alone accepts it


@pytest.mark.parametrize(("given", "env", "field"), [
    ({"compilation_config": {"splitting_ops": []}}, None, "compilation_config.splitting_ops"),
    ({"compilation_config": {"mode": 0}}, None, "compilation_config.mode"),
    ({"compilation_config": {"mode": 1}}, None, "compilation_config.mode"),
    ({}, "VLLM_USE_BREAKABLE_CUDAGRAPH", "VLLM_USE_BREAKABLE_CUDAGRAPH"),
])
def test_graphs_that_cannot_split_the_op_out_are_refused(world, gpu_like, monkeypatch, given, env, field):
    if env:
        monkeypatch.setenv(env, "1")
    plain = _build(world, guarded=False, **given).compilation_config
    assert plain.cudagraph_mode != CUDAGraphMode.NONE  # vLLM alone would capture graphs here
    err = _refusal(world, **given)
    assert err.field == field and "frozen" in err.problem and "enforce_eager=True" in err.fix


def test_eager_and_unconfigured_engines_are_untouched(world, gpu_like):
    plain = _build(world, guarded=False, enforce_eager=True)
    guarded = _build(world, guarded=True, enforce_eager=True)
    assert guarded.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    assert guarded.compilation_config.compute_hash() == plain.compilation_config.compute_hash()
    explicit_none = _build(world, guarded=True, compilation_config={"cudagraph_mode": "NONE"}).compilation_config
    assert explicit_none.mode == CompilationMode.VLLM_COMPILE and cfg.EDIT_OP not in explicit_none.splitting_ops
    unguarded = _build(world, guarded=False).compilation_config
    assert unguarded.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE and cfg.EDIT_OP not in unguarded.splitting_ops


def test_cpu_platform_is_untouched(world):
    """The real CPU platform (no fixture): no CUDA graphs, so nothing to change."""
    cpu_plain, cpu_guarded = _build(world, guarded=False), _build(world, guarded=True)
    assert cpu_guarded.additional_config["erasekit"]["digest"]  # erasekit did configure this engine
    assert cpu_guarded.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    assert cpu_guarded.compilation_config.compute_hash() == cpu_plain.compilation_config.compute_hash()


def test_compile_cache_key_covers_splitting_ops_and_erasekit_section(world, gpu_like):
    config = _build(world, guarded=True)
    key = config.compute_hash()
    without_op = copy.deepcopy(config)
    without_op.compilation_config.splitting_ops.remove(cfg.EDIT_OP)
    assert without_op.compute_hash() != key
    other_packs = copy.deepcopy(config)
    other_packs.additional_config["erasekit"]["digest"] = "0" * 64
    assert other_packs.compute_hash() != key
    assert copy.deepcopy(config).compute_hash() == key  # the hash is a function of the config


def test_worker_refuses_graphs_that_capture_the_op(world, gpu_like):
    """The load_model patch checks before loading weights (a config that bypassed EngineArgs)."""
    unsafe = _build(world, guarded=False)  # FULL_AND_PIECEWISE, op not split out
    unsafe.additional_config = {"erasekit": {"policy": str(world.policy_path)}}
    loaded = []
    load_model = vllm_plugin._wrap_load_model(lambda runner: loaded.append(runner))
    with pytest.raises(PolicyError, match="replay it frozen") as info:
        load_model(SimpleNamespace(vllm_config=unsafe))
    assert info.value.where == "vLLM worker" and not loaded
    piecewise_no_op = copy.deepcopy(unsafe)
    piecewise_no_op.compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE
    with pytest.raises(PolicyError, match="not among splitting_ops"):
        load_model(SimpleNamespace(vllm_config=piecewise_no_op))
    eager = _build(world, guarded=False, enforce_eager=True)
    eager.additional_config = {}  # not configured: nothing checked, nothing installed
    load_model(SimpleNamespace(vllm_config=eager))
    assert len(loaded) == 1


def test_model_runner_v2_is_refused(world, monkeypatch):
    """vLLM's CPU build has no Triton, so V2 would fail inside vLLM first; ``HAS_TRITON`` is
    patched (as on a GPU build) to reach erasekit's own refusal."""
    import vllm.config.vllm as vllm_config_module

    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert _build(world, guarded=False).use_v2_model_runner  # vLLM alone would run V2
    err = _refusal(world)
    assert err.field == "model runner" and "VLLM_USE_V2_MODEL_RUNNER=0" in err.fix


def test_model_runner_v2_worker_refuses_before_loading(world):
    """A configured engine that reaches a V2 runner anyway (a config built without EngineArgs)
    stops in the worker instead of serving unguarded; an unconfigured one loads as usual."""
    from vllm.v1.worker.cpu.model_runner import CPUModelRunner as CPUModelRunnerV2
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as ModelRunnerV2

    vllm_plugin.patch_model_runners()
    assert getattr(CPUModelRunnerV2.load_model, "_erasekit", False)  # inherited from the V2 GPU runner
    config = _build(world, guarded=False, enforce_eager=True)
    config.additional_config = {"erasekit": {"policy": str(world.policy_path)}}
    with pytest.raises(PolicyError, match="unguarded") as info:
        ModelRunnerV2.load_model(SimpleNamespace(vllm_config=config))
    assert info.value.where == "vLLM worker" and "VLLM_USE_V2_MODEL_RUNNER=0" in info.value.fix
    config.additional_config = {}
    with pytest.raises(Exception) as plain:  # reaches vLLM's own load_model (fails on the fake runner)
        ModelRunnerV2.load_model(SimpleNamespace(vllm_config=config))
    assert not isinstance(plain.value, PolicyError)
