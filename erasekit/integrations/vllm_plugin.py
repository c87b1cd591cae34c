"""The ``vllm.general_plugins`` entry point: stock vLLM picks erasekit up when it is installed.

vLLM calls :func:`register` in every process it starts (front end / API server, engine core,
workers, a registry-inspection subprocess). It patches three places, each doing nothing
unless the engine is configured (``ERASEKIT_CONFIG`` or ``additional_config["erasekit"]``):

* ``EngineArgs.create_engine_config`` (front end): loads and validates the policy and every
  pack *before* the engine starts, copies the configuration into ``additional_config`` (so it
  reaches every process and enters the compile-cache key) and adds erasekit's logits
  processor, which carries per-request toggles into the worker. Where CUDA graphs are on, it
  keeps the edit op out of them (``PIECEWISE`` graphs, the op among ``splitting_ops``: see
  :func:`~erasekit.integrations.vllm_config.make_cudagraph_safe`). A bad policy, a missing
  pack or an unsupported engine mode raises here: vLLM exits non-zero, never serves
  half-guarded.
* ``InputProcessor.process_inputs`` (front end): checks each request's toggles against the
  policy (``VLLMValidationError`` → HTTP 400 naming ``erase``) and sets the request's
  ``cache_salt`` from its active concept set, so prefix-cached KV never crosses concept sets.
* ``{CPU,GPU}ModelRunner.load_model`` (worker): refuses a configuration whose CUDA graphs
  would capture the edit op; after the weights load and before warm-up and compilation,
  checks every pack's fingerprint against the served model and attaches the hooks
  (:mod:`erasekit.integrations.vllm_runtime`).

``register`` is idempotent. If it fails while ``ERASEKIT_CONFIG`` is set it exits the
process: vLLM only logs a plugin that raises, which would silently serve unguarded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from typing import Any

logger = logging.getLogger("erasekit.vllm")

#: Fully qualified name of the request carrier (what ``--logits-processors`` would take).
LOGITS_PROCESSOR = "erasekit.integrations.vllm_runtime:EraseLogitsProcessor"
#: Methods whose edit of a token depends only on that token, so steered KV may be shared by
#: requests with the same concept set and a common prefix. Others salt by the whole prompt.
PREFIX_SAFE_METHODS = frozenset({"add_vector"})

_registered = False
_COUNTER: Any = None
_runners_patched = False
_FRONTEND: dict[str, Any] = {}
_ROUTERS: dict[str, dict[str, Any]] = {}


def register() -> None:
    """vLLM general-plugin entry point (idempotent, cheap when erasekit is not configured)."""
    global _registered
    if _registered:
        return
    try:
        _patch_engine_args()
        _patch_input_processor()
        if os.environ.get("ERASEKIT_CONFIG") or _in_engine_process():
            patch_model_runners()
        _registered = True
    except Exception as exc:
        if os.environ.get("ERASEKIT_CONFIG"):
            logger.exception("erasekit: plugin failed to load while ERASEKIT_CONFIG is set")
            raise SystemExit(f"erasekit: refusing to start unguarded: the vLLM plugin failed to load ({exc!r})") from exc
        logger.exception("erasekit: vLLM plugin failed to load (erasekit is not configured, continuing)")


def _in_engine_process() -> bool:
    return any(m in sys.modules for m in ("vllm.v1.worker.worker_base", "vllm.v1.engine.core"))


# ------------------------------------------------------------------------------ front end
def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_erasekit", False):
        return

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        from erasekit.errors import PolicyError
        from erasekit.integrations import vllm_config as cfg

        section = cfg.section_from(self.additional_config) or cfg.section_from_env()
        if section is None:
            return original(self, *args, **kwargs)
        config = cfg.prepare_section(section)  # raises on any bad policy / pack: fail closed
        self.additional_config = {**(self.additional_config or {}), cfg.CONFIG_KEY: config.section}
        procs = list(self.logits_processors or [])
        if LOGITS_PROCESSOR not in procs:
            procs.append(LOGITS_PROCESSOR)
        self.logits_processors = procs
        patch_model_runners()  # in-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) load here
        requested_mode, requested_ops = _requested_graphs(self.compilation_config)
        vllm_config = original(self, *args, **kwargs)
        if getattr(vllm_config, "use_v2_model_runner", False):
            raise PolicyError("vLLM engine", "model runner", "erasekit supports vLLM's V1 model runner only, and "
                              "this engine would use Model Runner V2", "set VLLM_USE_V2_MODEL_RUNNER=0")
        if vllm_config.speculative_config is not None:
            raise PolicyError("vLLM engine", "speculative_config", "speculative decoding skips the logits processor "
                              "that carries per-request toggles", "serve without speculative decoding")
        # Here, in the front end, the resolved config is still ours to change: the engine core and
        # workers receive this object, and the compile-cache key is computed from it later.
        changes = cfg.make_cudagraph_safe(vllm_config, requested_mode, requested_ops)
        if changes:
            logger.info("erasekit: %s: full CUDA graphs would replay erasekit's edit op frozen (captured once, "
                        "its per-request row selection never re-run); piecewise graphs run it eagerly between "
                        "the graph pieces every step", "; ".join(changes))
        _FRONTEND[config.digest] = config
        logger.info("erasekit: configured; concepts %s (mandatory %s)", sorted(config.policy.concepts),
                    sorted(config.policy.mandatory))
        return vllm_config

    create_engine_config._erasekit = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config


def _requested_graphs(compilation_config: Any) -> tuple[Any, Any]:
    """``(cudagraph_mode, splitting_ops)`` as the operator set them (``None``: left to vLLM)."""
    if isinstance(compilation_config, dict):
        return compilation_config.get("cudagraph_mode"), compilation_config.get("splitting_ops")
    return getattr(compilation_config, "cudagraph_mode", None), getattr(compilation_config, "splitting_ops", None)


def _frontend_config(vllm_config: Any) -> Any:
    from erasekit.integrations import vllm_config as cfg
    from erasekit.integrations import vllm_runtime

    section = cfg.section_from(vllm_config.additional_config)
    if section is None:
        return None
    digest = section.get("digest", "")
    config = _FRONTEND.get(digest)
    if config is None:  # a front end that did not go through create_engine_config here
        config = cfg.prepare_section(section)
        _FRONTEND[config.digest] = config
    if digest not in vllm_runtime._POLICY_CACHE:
        vllm_runtime._POLICY_CACHE[digest] = config.policy
    return config


def routers_of(config: Any) -> dict[str, Any]:
    """Routers of the packs that have one (loaded once per engine configuration)."""
    routers = _ROUTERS.get(config.digest)
    if routers is None:
        from erasekit.steering.router import ConceptRouter

        routers = {n: r for n, p in config.packs.items() if (r := ConceptRouter.from_pack(p)) is not None}
        _ROUTERS[config.digest] = routers
    return routers


def request_salt(config: Any, active: frozenset[str], prompt_token_ids: Any, user_salt: str | None) -> str | None:
    """``cache_salt`` for a request: per concept set, and per prompt for input-aware methods."""
    from erasekit.integrations import vllm_config as cfg

    salt = cfg.salt_for(active, config.digest, user_salt)
    if active and not all(config.packs[n].method in PREFIX_SAFE_METHODS for n in active):
        ids = prompt_token_ids if prompt_token_ids is not None else []
        tag = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]
        salt = f"{salt}|p{tag}"
    return salt


def _count(concepts: Any, outcome: str) -> None:
    """``erasekit_requests_total{concept, outcome}`` on vLLM's ``/metrics`` (front-end process).

    Outcomes: ``active`` (the concept was applied to the request), ``routed_out`` (toggled or
    mandatory, but the pack's router did not fire for this prompt), ``rejected`` (HTTP 400).
    """
    global _COUNTER
    if _COUNTER is None:
        try:
            from prometheus_client import Counter

            _COUNTER = Counter("erasekit_requests", "Requests seen by erasekit, by concept and outcome",
                               ["concept", "outcome"])
        except Exception:  # metrics are a convenience; never block serving on them
            _COUNTER = False
    if _COUNTER:
        for name in concepts:
            _COUNTER.labels(concept=name, outcome=outcome).inc()


def _patch_input_processor() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, "_erasekit", False):
        return

    def process_inputs(self: Any, request_id: str, prompt: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        config = _frontend_config(self.vllm_config)
        if config is None or not hasattr(params, "extra_args"):
            return original(self, request_id, prompt, params, *args, **kwargs)
        from vllm.exceptions import VLLMValidationError

        from erasekit.errors import ErasekitError
        from erasekit.integrations import vllm_config as cfg
        from erasekit.integrations.vllm_runtime import request_toggles

        value = request_toggles(params)
        try:
            active = config.policy.resolve(value, where=cfg.REQUEST_KEY)
        except ErasekitError as exc:
            _count(["(invalid)"], "rejected")
            raise VLLMValidationError(str(exc), parameter=cfg.REQUEST_KEY, value=str(value)[:200]) from None
        request = original(self, request_id, prompt, params, *args, **kwargs)
        extra = request.sampling_params.extra_args
        if extra is not None:
            extra.pop(cfg.ROUTED_OUT_KEY, None)  # only the front end may write this key
        routers = routers_of(config)
        routed = [n for n in sorted(active) if n in routers]
        if routed and request.prompt_token_ids is not None and self.tokenizer is not None:
            text = self.tokenizer.decode(list(request.prompt_token_ids), skip_special_tokens=True)
            out = [n for n in routed if not routers[n].matches(text)]
            if out:
                request.sampling_params.extra_args = {**(extra or {}), cfg.ROUTED_OUT_KEY: out}
                active = active - frozenset(out)
                _count(out, "routed_out")
        _count(sorted(active), "active")
        logger.debug("erasekit: request %s active concepts %s", request_id, sorted(active))
        request.cache_salt = request_salt(config, active, request.prompt_token_ids, request.cache_salt)
        return request

    process_inputs._erasekit = True  # type: ignore[attr-defined]
    InputProcessor.process_inputs = process_inputs


# ------------------------------------------------------------------------------ worker
def patch_model_runners() -> None:
    """Wrap the V1 model runners' ``load_model`` so hooks go in before warm-up / compile."""
    global _runners_patched
    if _runners_patched:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        classes.append(CPUModelRunner)
    except ImportError:  # GPU builds may not ship the CPU runner
        pass
    for cls in classes:
        original = cls.__dict__.get("load_model")
        if original is None or getattr(original, "_erasekit", False):
            continue
        cls.load_model = _wrap_load_model(original)
    try:  # Model Runner V2 (its CPU runner inherits this load_model)
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as ModelRunnerV2
    except ImportError:
        ModelRunnerV2 = None
    original = ModelRunnerV2.__dict__.get("load_model") if ModelRunnerV2 is not None else None
    if original is not None and not getattr(original, "_erasekit", False):
        ModelRunnerV2.load_model = _refuse_v2_load_model(original)
    _runners_patched = True


def _refuse_v2_load_model(original: Any) -> Any:
    """V2 runners have no persistent batch for the request carrier, so a configured engine that
    reaches one (e.g. a config built without ``EngineArgs``, which the front-end check never
    saw) must stop here rather than serve every request unguarded."""

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        from erasekit.integrations import vllm_config as cfg

        if cfg.section_from(self.vllm_config.additional_config) is not None:
            from erasekit.errors import PolicyError

            raise PolicyError("vLLM worker", "model runner", "erasekit hooks only vLLM's V1 model runner; "
                              "this Model Runner V2 worker would serve every request unguarded",
                              "set VLLM_USE_V2_MODEL_RUNNER=0")
        return original(self, *args, **kwargs)

    load_model._erasekit = True  # type: ignore[attr-defined]
    return load_model


def _wrap_load_model(original: Any) -> Any:
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        from erasekit.integrations import vllm_config as cfg

        configured = cfg.section_from(self.vllm_config.additional_config) is not None
        if configured:  # before any weight loads: an unsafe config must not start at all
            cfg.check_cudagraph_safe(self.vllm_config, where="vLLM worker")
        result = original(self, *args, **kwargs)
        if configured and not hasattr(self, "_erasekit_eraser"):
            from erasekit.integrations.vllm_runtime import install

            install(self)  # raises on a pack/model mismatch: the engine must not start
        return result

    load_model._erasekit = True  # type: ignore[attr-defined]
    return load_model
