"""Operator configuration of the vLLM plugin: where it comes from and what it must contain.

The plugin is configured in exactly one place per engine, ``additional_config["erasekit"]``,
because vLLM ships that dict to every process and hashes it into the torch.compile cache key:
an artifact compiled with erasekit's hooks can never be reused by an engine without them, or
with other packs. The ``ERASEKIT_CONFIG`` environment variable (a policy file path) is the
operator's shortcut; the front end copies it into ``additional_config`` at start-up.

``additional_config["erasekit"]`` holds::

    {"policy": "/abs/path/policy.yaml" | {inline policy dict},
     "digest": "<sha256 of the policy and every pack's files>"}   # filled in at start-up

A configuration error is raised as :class:`~erasekit.errors.PolicyError` /
:class:`~erasekit.errors.PackError` at engine start, so vLLM exits non-zero instead of
serving half-guarded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erasekit.errors import PackError, PolicyError
from erasekit.guardrails.fingerprint import ModelFingerprint, hash_embedding_slice
from erasekit.guardrails.pack import MANIFEST_NAME, ConceptPack
from erasekit.guardrails.policy import Policy
from erasekit.steering.residual import ResidualEdit, edit_from_pack

#: Environment variable naming the operator's policy file.
ENV_VAR = "ERASEKIT_CONFIG"
#: Key of erasekit's section in vLLM's ``additional_config``.
CONFIG_KEY = "erasekit"
#: Request parameter (``SamplingParams.extra_args`` key / ``vllm_xargs`` key) carrying toggles.
REQUEST_KEY = "erase"
#: Bumped whenever the hook code changes what compiled graphs contain (enters the compile key).
HOOK_VERSION = 1
#: Private ``extra_args`` key the front end writes (never the client): concepts whose router
#: did not fire for this prompt. Whatever a client sends under this key is overwritten.
ROUTED_OUT_KEY = "_erasekit_routed_out"
#: Salt prefix, so an erasekit salt can never collide with a client-chosen one.
SALT_PREFIX = "erasekit:"
#: The op erasekit's layer hooks call, spelt the way vLLM's ``compilation_config.splitting_ops``
#: names ops. It must run outside CUDA graphs: its body reads the live slot table every step.
EDIT_OP = "erasekit::vllm_edit_"
#: What a refusal below suggests instead (every option keeps the op out of CUDA graphs).
_GRAPH_FIX = ('leave compilation_config.cudagraph_mode unset (erasekit then uses PIECEWISE graphs with its op '
              'between the pieces) or set it to "PIECEWISE", or set it to "NONE", or serve with enforce_eager=True')


@dataclass(frozen=True)
class EngineConfig:
    """The validated erasekit section of one engine's configuration."""

    policy: Policy
    digest: str
    section: dict[str, Any]
    packs: dict[str, ConceptPack]


def section_from(additional_config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """erasekit's section of ``additional_config``, or ``None`` when the plugin is not configured."""
    if not additional_config or CONFIG_KEY not in additional_config:
        return None
    section = additional_config[CONFIG_KEY]
    where = f"additional_config[{CONFIG_KEY!r}]"
    if not isinstance(section, Mapping):
        raise PolicyError(where, None, "expected a mapping like {\"policy\": \"policy.yaml\"}",
                          "pass additional_config={\"erasekit\": {\"policy\": \"/path/policy.yaml\"}}")
    unknown = sorted(set(section) - {"policy", "digest"})
    if unknown:
        raise PolicyError(where, unknown[0], "unknown key", "use only 'policy' (and 'digest', set by erasekit)")
    if "policy" not in section:
        raise PolicyError(where, "policy", "missing", "set it to a policy file path or an inline policy mapping")
    return dict(section)


def section_from_env() -> dict[str, Any] | None:
    """``{"policy": <abs path>}`` from ``ERASEKIT_CONFIG``, or ``None`` when unset/empty."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    return {"policy": str(Path(value).expanduser().resolve())}


def load_policy(section: Mapping[str, Any]) -> Policy:
    """The policy named by a section (a file path, or an inline mapping with absolute pack paths)."""
    spec = section["policy"]
    if isinstance(spec, str):
        return Policy.from_file(spec)
    if isinstance(spec, Mapping):
        return Policy.from_dict(dict(spec), where=f"additional_config[{CONFIG_KEY!r}].policy")
    raise PolicyError(f"additional_config[{CONFIG_KEY!r}]", "policy", f"expected a path or a mapping, got "
                      f"{type(spec).__name__}", "set policy to a policy file path")


def load_packs(policy: Policy) -> dict[str, ConceptPack]:
    """Load and validate every pack the policy names (no model check yet: see :func:`check_packs`)."""
    packs: dict[str, ConceptPack] = {}
    for name, entry in sorted(policy.entries.items()):
        if entry.pack is None:
            raise PolicyError("policy", f"concepts.{name}.pack", "no pack given",
                              "every concept served by vLLM needs a pack: set pack: path/to/pack")
        pack = ConceptPack.from_pretrained(entry.pack)
        if pack.name != name:
            raise PackError(str(entry.pack), "concept.name", f"pack is for concept {pack.name!r}, policy says {name!r}",
                            "point the policy entry at the right pack, or rename the entry")
        if pack.spec.family != "llm":
            raise PackError(str(entry.pack), "method", f"method {pack.method!r} is not an LLM method",
                            "vLLM serves residual-stream (LLM) packs only")
        packs[name] = pack
    return packs


def config_digest(policy: Policy, packs: Mapping[str, ConceptPack]) -> str:
    """A stable hash of everything that changes what the hooks compute."""
    h = hashlib.sha256()
    h.update(json.dumps({"hook_version": HOOK_VERSION, "policy": policy.to_dict()}, sort_keys=True).encode())
    for name in sorted(packs):
        src = packs[name].source
        manifest = (Path(src) / MANIFEST_NAME).read_bytes() if src is not None else b""
        # The manifest records the SHA-256 of every pack file, so hashing it covers the tensors.
        h.update(name.encode() + b"\0" + hashlib.sha256(manifest).digest())
    return h.hexdigest()


def prepare_section(section: Mapping[str, Any]) -> EngineConfig:
    """Front-end start-up check: load policy and packs, fill in the digest (fail closed)."""
    policy = load_policy(section)
    packs = load_packs(policy)
    digest = config_digest(policy, packs)
    given = section.get("digest")
    if given is not None and given != digest:
        raise PolicyError(f"additional_config[{CONFIG_KEY!r}]", "digest", "packs or policy changed on disk since the "
                          "engine was configured", "restart the engine so every process loads the same packs")
    out = dict(section)
    out["digest"] = digest
    return EngineConfig(policy, digest, out, packs)


def build_edits(packs: Mapping[str, ConceptPack]) -> dict[str, ResidualEdit]:
    """One residual edit per concept."""
    return {name: edit_from_pack(pack) for name, pack in sorted(packs.items())}


def salt_for(active: frozenset[str], digest: str, user_salt: str | None) -> str | None:
    """The prefix-cache salt of a request with ``active`` concepts.

    KV computed under one concept set must never be reused under another (it leaks unsteered
    activations into steered requests and vice versa), so the salt names the set and the
    engine's pack digest. Requests with no active concept keep the client's salt untouched and
    share the cache with plain traffic.
    """
    if not active:
        return user_salt
    tag = hashlib.sha256((digest + "|" + ",".join(sorted(active))).encode()).hexdigest()[:32]
    return f"{SALT_PREFIX}{tag}" + (f"|{user_salt}" if user_salt else "")


def fingerprint_vllm_model(model: Any, hf_text_config: Any, architecture: str) -> tuple[ModelFingerprint, bool]:
    """Fingerprint a vLLM model; the bool says whether the embedding hash could be computed here.

    Under tensor parallelism only the rank holding vocabulary rows 0..63 can hash them, and
    under pipeline parallelism only the first stage holds the embedding; other ranks check
    everything but the hash (rank 0 / stage 0 checks it, and all ranks load one checkpoint).
    """
    weight = None
    for _, module in model.named_modules():
        if type(module).__name__ == "VocabParallelEmbedding":
            start = getattr(getattr(module, "shard_indices", None), "org_vocab_start_index", 0)
            if start == 0 and getattr(module, "weight", None) is not None and module.weight.shape[0] >= 64:
                weight = module.weight
            break
    digest = hash_embedding_slice(weight) if weight is not None else ""
    return ModelFingerprint(
        architecture=architecture,
        hidden_size=int(hf_text_config.hidden_size),
        num_layers=int(hf_text_config.num_hidden_layers),
        vocab_size=int(hf_text_config.vocab_size),
        embedding_sha256=digest,
    ), weight is not None


def check_packs(packs: Mapping[str, ConceptPack], actual: ModelFingerprint, has_hash: bool) -> None:
    """Refuse packs calibrated for another model (PackError names the pack and the field)."""
    if not has_hash:
        actual = ModelFingerprint(**{**actual.to_dict(), "embedding_sha256": ""})
    for pack in packs.values():
        expected = pack.fingerprint
        if not has_hash:
            expected = ModelFingerprint(**{**expected.to_dict(), "embedding_sha256": ""})
        expected.check_matches(actual, str(pack.source or f"pack {pack.name!r}"))


# ------------------------------------------------------------------------------ CUDA graphs
def make_cudagraph_safe(vllm_config: Any, requested_mode: Any = None, requested_splitting_ops: Any = None) -> list[str]:
    """Keep :data:`EDIT_OP` out of CUDA graphs (front end, after vLLM resolved its config).

    A CUDA graph records the kernels the op launched at capture and replays them: the op's
    Python body, which decides from the live slot table which rows to edit, would never run
    again, so steering would be stuck on the capture-time rows (or always off). vLLM's
    piecewise graphs leave the ``splitting_ops`` outside the graphs and run them eagerly every
    step, so erasekit needs piecewise graphs only, with its op among the splitting ops.

    ``requested_*`` are what the operator set in ``compilation_config`` before vLLM filled in
    its defaults (``None``: unset). Nothing changes when no CUDA graph will be captured (vLLM
    resolved ``cudagraph_mode`` to ``NONE``: ``enforce_eager``, CPU, platforms without graph
    support). vLLM's default ``FULL_AND_PIECEWISE`` becomes ``PIECEWISE``; any full-graph mode
    the operator asked for, or one vLLM cannot split, is refused (``PolicyError`` naming the
    field). ``vllm_config`` is changed in place before the engine starts, so every process
    receives the same configuration and the compile-cache key covers it. Returns the changes.
    """
    import vllm.envs as envs
    from vllm.config import CompilationMode, CUDAGraphMode

    cc = vllm_config.compilation_config
    mode = cc.cudagraph_mode
    if mode is None or mode == CUDAGraphMode.NONE:
        return []
    where = "vLLM engine"
    frozen = "erasekit's edit op would run once at capture and be replayed frozen (steering stuck on the " \
             "capture-time batch)"
    if envs.VLLM_USE_BREAKABLE_CUDAGRAPH:
        raise PolicyError(where, "VLLM_USE_BREAKABLE_CUDAGRAPH", "breakable CUDA graphs break only at vLLM's own "
                          f"attention and KV-cache ops, so {frozen}", "set VLLM_USE_BREAKABLE_CUDAGRAPH=0 (erasekit "
                          f"then uses piecewise graphs with its op between the pieces), or {_GRAPH_FIX}")
    if mode.has_full_cudagraphs():
        if requested_mode is not None:
            raise PolicyError(where, "compilation_config.cudagraph_mode", f"{mode.name} (set in the configuration) "
                              f"captures full-model CUDA graphs, so {frozen}", _GRAPH_FIX)
        if cc.mode != CompilationMode.VLLM_COMPILE:
            raise PolicyError(where, "compilation_config.mode", f"CUDA graphs are on ({mode.name}) but compilation "
                              f"mode {cc.mode.name} cannot split the model into pieces, so the graphs are full and "
                              f"{frozen}", "leave compilation_config.mode unset (VLLM_COMPILE), or set "
                              'compilation_config.cudagraph_mode to "NONE", or serve with enforce_eager=True')
        if not cc.splitting_ops_contain_attention():
            field = "compilation_config.splitting_ops"
            if requested_splitting_ops is None and cc.pass_config.fuse_attn_quant:
                field = "compilation_config.pass_config.fuse_attn_quant"
            raise PolicyError(where, field, f"vLLM's attention ops are not splitting ops here, so vLLM captures full "
                              f"CUDA graphs ({mode.name}) and {frozen}", "leave splitting_ops unset (erasekit adds its "
                              "op to vLLM's defaults) and fuse_attn_quant off, or set "
                              'compilation_config.cudagraph_mode to "NONE", or serve with enforce_eager=True')
        if mode != CUDAGraphMode.FULL_AND_PIECEWISE:  # vLLM's own choice for this model (e.g. encoder-decoder)
            raise PolicyError(where, "compilation_config.cudagraph_mode", f"vLLM chose {mode.name} for this model, "
                              f"which captures full-model CUDA graphs, so {frozen}",
                              'set compilation_config.cudagraph_mode to "NONE", or serve with enforce_eager=True')
    changes = []
    if mode != CUDAGraphMode.PIECEWISE:
        cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
        changes.append(f"compilation_config.cudagraph_mode {mode.name} -> PIECEWISE")
    if EDIT_OP not in (cc.splitting_ops or []):
        cc.splitting_ops = [*(cc.splitting_ops or []), EDIT_OP]
        changes.append(f"{EDIT_OP!r} appended to compilation_config.splitting_ops")
    check_cudagraph_safe(vllm_config)
    return changes


def check_cudagraph_safe(vllm_config: Any, where: str = "vLLM engine") -> None:
    """Refuse a resolved configuration whose CUDA graphs would capture :data:`EDIT_OP`.

    The worker calls this before loading the model, for engines whose configuration did not
    go through :func:`make_cudagraph_safe` (a ``VllmConfig`` built without ``EngineArgs``).
    """
    import vllm.envs as envs
    from vllm.config import CompilationMode, CUDAGraphMode

    cc = vllm_config.compilation_config
    mode = cc.cudagraph_mode
    if mode is None or mode == CUDAGraphMode.NONE:
        return
    if (envs.VLLM_USE_BREAKABLE_CUDAGRAPH or mode != CUDAGraphMode.PIECEWISE
            or cc.mode != CompilationMode.VLLM_COMPILE or EDIT_OP not in (cc.splitting_ops or [])):
        raise PolicyError(where, "compilation_config.cudagraph_mode", f"CUDA graphs {mode.name} (compilation mode "
                          f"{cc.mode.name}, {EDIT_OP!r} {'' if EDIT_OP in (cc.splitting_ops or []) else 'not '}"
                          "among splitting_ops) would capture erasekit's edit op and replay it frozen; this "
                          "configuration did not go through erasekit's start-up check", "build the engine with "
                          f"EngineArgs / LLM / vllm serve (erasekit then picks PIECEWISE with {EDIT_OP!r} split "
                          f"out), or {_GRAPH_FIX}")
