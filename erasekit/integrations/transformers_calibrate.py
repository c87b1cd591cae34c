"""Calibration on transformers models: collect decoder-layer outputs, fit a method, write a pack.

Activations are read with forward hooks on the very modules the guard edits
(:func:`find_decoder_layers`), so calibration and inference see the same tensor — the
reference MLLMEraser code reads block inputs but edits block outputs, an off-by-one erasekit
does not repeat.

Text prompts are formatted the way they will be served: with the tokenizer's chat template
(one user turn + generation prompt) when it has one (``prompt_format="chat"``), else as is.
Multimodal models take pre-processed examples instead of text (``inputs=``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from erasekit.errors import ErasekitError
from erasekit.guardrails.cli_inputs import concept_from_args, parse_overrides
from erasekit.guardrails.concept import Concept
from erasekit.guardrails.fingerprint import fingerprint_model
from erasekit.guardrails.pack import ConceptPack
from erasekit.integrations.transformers import _model_device, find_decoder_layers

__all__ = ["calibrate", "calibrate_main", "collect_activations", "format_prompts"]

DEFAULT_TARGET = "I'm sorry, but I can't help with that."
Example = str | Mapping[str, torch.Tensor]


def format_prompts(tokenizer: Any, prompts: Sequence[str], prompt_format: str, suffix: str | None = None,
                   template: str | None = None) -> list[str]:
    """Prompts as the model will see them; ``suffix`` is appended as the start of the answer.

    ``prompt_format``: ``"chat"`` (the tokenizer's chat template, one user turn), ``"raw"``
    (as is) or ``"template"`` (``template`` with ``{prompt}`` replaced, e.g. a few-shot QA frame).
    """
    if prompt_format not in ("chat", "raw", "template"):
        raise ErasekitError("calibrate", "prompt_format", f"got {prompt_format!r}", "use 'chat', 'raw' or 'template'")
    if prompt_format == "template" and (not isinstance(template, str) or "{prompt}" not in template):
        raise ErasekitError("calibrate", "prompt_template", "template format needs a string containing {prompt}",
                            "set prompt_template='Question: {prompt}\\nAnswer:'")
    out = []
    for p in prompts:
        if prompt_format == "chat":
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True)
        elif prompt_format == "template":
            text = template.replace("{prompt}", p)  # type: ignore[union-attr]
        else:
            text = p
        out.append(text + (suffix if prompt_format == "chat" else " " + suffix) if suffix else text)
    return out


@torch.inference_mode()
def collect_activations(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    add_special_tokens: bool | None = None,
    progress: bool = True,
    desc: str = "activations",
) -> dict[str, torch.Tensor]:
    """Last-token and mean-over-tokens decoder-layer outputs, ``{"last", "mean"}: [L, N, d]`` fp32.

    ``examples`` are prompt strings (batched with left padding) or ready model-input mappings
    (one example each, e.g. a processor's output with ``pixel_values``).
    """
    from tqdm.auto import tqdm

    blocks = find_decoder_layers(model)
    layer_ids = list(range(len(blocks))) if layers is None else list(layers)
    captured: dict[int, torch.Tensor] = {}
    handles = [blocks[i].register_forward_hook(
        lambda m, a, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i in layer_ids]
    device = _model_device(model)
    last: list[torch.Tensor] = []
    mean: list[torch.Tensor] = []
    texts = [e for e in examples if isinstance(e, str)]
    if texts and len(texts) != len(examples):
        raise ErasekitError("calibrate", "examples", "mix of text prompts and model-input mappings",
                            "pass either all strings or all mappings")
    try:
        if texts:
            if tokenizer is None:
                raise ErasekitError("calibrate", "tokenizer", "text prompts need a tokenizer", "pass tokenizer=")
            side = tokenizer.padding_side
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            batches = [texts[s:s + batch_size] for s in range(0, len(texts), batch_size)]
            try:
                for chunk in tqdm(batches, desc=desc, disable=not progress, leave=False):
                    kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
                    enc = tokenizer(chunk, return_tensors="pt", padding=True, **kw).to(device)
                    model(**enc, use_cache=False)
                    _pool(captured, layer_ids, enc["attention_mask"], last, mean)
            finally:
                tokenizer.padding_side = side
        else:
            for example in tqdm(examples, desc=desc, disable=not progress, leave=False):
                enc = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}
                model(**enc, use_cache=False)
                mask = enc.get("attention_mask")
                if mask is None:
                    mask = torch.ones(enc["input_ids"].shape, dtype=torch.long, device=device)
                _pool(captured, layer_ids, mask, last, mean)
    finally:
        for h in handles:
            h.remove()
    return {"last": torch.cat(last, 1), "mean": torch.cat(mean, 1)}


def _pool(captured: dict[int, torch.Tensor], layer_ids: list[int], mask: torch.Tensor,
          last: list[torch.Tensor], mean: list[torch.Tensor]) -> None:
    hs = torch.stack([captured[i].float() for i in layer_ids])  # [L, B, T, d]
    m = mask.to(hs.device).bool()
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last_pos = torch.where(m, positions, -1).amax(1).clamp_min(0)  # left or right padding
    batch = torch.arange(m.shape[0], device=m.device)
    last.append(hs[:, batch, last_pos].cpu())
    w = m.to(hs.dtype)[None, :, :, None]
    mean.append(((hs * w).sum(2) / w.sum(2).clamp_min(1.0)).cpu())


def _hyperparameters(method: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    from erasekit.guardrails.methods import get_method

    get_method(method, where="calibrate")
    module = __import__(f"erasekit.steering.{method}", fromlist=["DEFAULT_HYPERPARAMETERS"])
    hp = dict(module.DEFAULT_HYPERPARAMETERS)
    hp.update({"router": False, "router_threshold": 0.68, "router_keywords": True})
    for key, value in (overrides or {}).items():
        if key not in hp and key not in ("prompt_format", "prompt_template"):
            raise ErasekitError("calibrate", f"hyperparameters.{key}", "unknown hyperparameter",
                                f"{method} accepts {sorted(hp)}")
        hp[key] = value
    return hp


def calibrate(
    model: torch.nn.Module,
    concept: Concept,
    method: str = "kif",
    *,
    tokenizer: Any = None,
    hyperparameters: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Sequence[Mapping[str, torch.Tensor]]] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> ConceptPack:
    """Calibrate ``concept`` on ``model`` with ``method`` (``"mllmeraser"`` or ``"kif"``).

    Args:
        model: a transformers causal LM or multimodal LM (eval mode).
        concept: forget prompts (elicit the concept), retain prompts (must keep working),
            optional ``target`` (refusal text) and ``keywords`` (router fallback).
        tokenizer: for text prompts.
        hyperparameters: overrides of the method's defaults (see ``DEFAULT_HYPERPARAMETERS``),
            plus ``router`` (bool), ``router_threshold``, ``prompt_format`` ("chat" | "raw").
        inputs: multimodal calibration, ``{"forget": [...], "retain": [...], "recall": [...],
            "erasure": [...]}`` of model-input mappings (processor outputs), replacing the text.
    """
    if method not in ("mllmeraser", "kif"):
        raise ErasekitError("calibrate", "method", f"unknown LLM method {method!r}", "use 'mllmeraser' or 'kif'")
    start = time.perf_counter()
    hp = _hyperparameters(method, hyperparameters)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    template = hp.pop("prompt_template", None)
    prompt_format = hp.pop("prompt_format", "template" if template else ("chat" if has_template else "raw"))
    n_layers = len(find_decoder_layers(model))
    target = concept.target or DEFAULT_TARGET
    if inputs is None:
        if len(concept.forget) < 2 or len(concept.retain) < 2:
            raise ErasekitError("calibrate", "concept", "need at least 2 forget and 2 retain prompts",
                                "add more example prompts to the concept")
        fmt = lambda ps, suffix=None: format_prompts(tokenizer, ps, prompt_format, suffix, template)  # noqa: E731
        add_special = False if prompt_format == "chat" else None
        sets: dict[str, list[Any]] = {"forget": fmt(concept.forget), "retain": fmt(concept.retain)}
        if method == "mllmeraser":
            # recall = the first ≤16 forget prompts (their activations are reused, not recomputed);
            # erasure = the same prompts followed by the refusal target as the answer's start
            sets["erasure"] = fmt(list(concept.forget[: int(hp["max_pairs"])]), target)
        elif hp["refusal_strength"]:
            sets["retain_refuse"] = fmt(list(concept.retain[: int(hp["refusal_prompts"])]), target)
    else:
        add_special = None
        sets = {k: list(v) for k, v in inputs.items()}
        for key in ("forget", "retain"):
            if len(sets.get(key, [])) < 2:
                raise ErasekitError("calibrate", f"inputs.{key}", "need at least 2 examples", f"pass inputs['{key}']")
        if method == "mllmeraser" and "erasure" not in sets:
            raise ErasekitError("calibrate", "inputs.erasure", "MLLMEraser needs knowledge-erasure examples",
                                "pass inputs['erasure'] (e.g. the prompts with a refusal-style answer)")
    acts = {k: collect_activations(model, tokenizer, v, batch_size=batch_size, add_special_tokens=add_special,
                                   progress=progress, desc=f"{concept.name}/{k}")
            for k, v in sets.items() if k != "retain_refuse"}
    if "recall" not in acts:
        n_pairs = min(int(hp.get("max_pairs", 16)), acts["forget"]["last"].shape[1])
        acts["recall"] = {k: v[:, :n_pairs] for k, v in acts["forget"].items()}
    if method == "mllmeraser":
        from erasekit.steering.mllmeraser import fit_mllmeraser

        layers = hp["layers"] if hp["layers"] is not None else list(range(1, n_layers))
        idx = torch.tensor(layers, dtype=torch.int64)
        tensors = fit_mllmeraser(acts["recall"]["last"][idx], acts["erasure"]["last"][idx],
                                 acts["forget"]["last"][idx], acts["retain"]["last"][idx],
                                 null_ratio=hp["null_ratio"], ridge_gamma=hp["ridge_gamma"])
        tensors["layers"] = idx
        hp["layers"] = layers
    else:
        from erasekit.steering.kif import mine_signatures, refusal_direction

        cand = hp["candidate_layers"] if hp["candidate_layers"] is not None else list(range(n_layers))
        cidx = torch.tensor(cand, dtype=torch.int64)
        sig = mine_signatures(acts["forget"]["mean"][cidx], acts["retain"]["mean"][cidx],
                              top_k_directions=hp["top_k_directions"], significance=hp["significance"])
        order = torch.argsort(sig["effect_size"], descending=True)[: int(hp["num_layers"])]
        order = order.sort().values
        tensors = {k: sig[k][order].contiguous() for k in ("mean", "scale", "signature_z", "directions",
                                                            "gate_mu", "gate_sigma")}
        tensors["layers"] = cidx[order].contiguous()
        tensors["effect_size"] = sig["effect_size"].contiguous()  # every candidate layer, for audit
        tensors["candidate_layers"] = cidx
        if hp["refusal_strength"] and "retain_refuse" in sets:
            refuse = collect_activations(model, tokenizer, sets["retain_refuse"], batch_size=batch_size,
                                         add_special_tokens=add_special, progress=progress,
                                         desc=f"{concept.name}/refusal")["last"][cidx[order]]
            helpful = acts["retain"]["last"][cidx[order]][:, : refuse.shape[1]]  # the same prompts, no suffix
            tensors["refusal"] = refusal_direction(refuse, helpful, tensors["directions"])
        else:
            tensors["refusal"] = torch.zeros_like(tensors["mean"])
        # typical residual size at the edited layers, so a refusal strength can be set relative to it
        tensors["residual_norm"] = acts["retain"]["last"][cidx[order]].norm(dim=-1).mean(-1).contiguous()
        hp["candidate_layers"] = cand
    if hp.get("router") not in (False, True, "keywords", "embedding"):
        raise ErasekitError("calibrate", "hyperparameters.router", f"got {hp.get('router')!r}",
                            "use false, true (embedding + keywords), 'embedding' or 'keywords'")
    if hp["router"] == "keywords" and not concept.keywords:
        raise ErasekitError("calibrate", "concept.keywords", "router='keywords' needs keywords", "pass --keywords")
    if hp["router"] in (True, "embedding"):
        from erasekit.steering.router import fit_centroid

        tensors["router_centroid"] = fit_centroid(list(concept.forget))
    hp["router_keywords"] = hp["router_keywords"] and hp["router"] != "embedding"
    hp["prompt_format"] = prompt_format
    if template is not None:
        hp["prompt_template"] = template
    hp["calibration_seconds"] = round(time.perf_counter() - start, 3)
    hp["hook_site"] = "decoder_layer_output"
    pack = ConceptPack(concept=concept, method=method, fingerprint=fingerprint_model(model),
                       tensors=tensors, hyperparameters=hp)
    pack.validate()
    return pack


# ---------------------------------------------------------------------------- CLI
def calibrate_main(args: argparse.Namespace) -> int:
    """``erasekit calibrate --method mllmeraser|kif``: load the model, calibrate, save the pack."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ErasekitError(str(model_dir), None, "not a transformers model directory (no config.json)",
                            "pass --model DIR of a saved model (save_pretrained)")
    concept = concept_from_args(args)
    overrides = parse_overrides(args.set)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    start = time.perf_counter()
    pack = calibrate(model, concept, args.method, tokenizer=tokenizer, hyperparameters=overrides)
    out = pack.save_pretrained(args.output)
    print(f"wrote {args.method} pack for {concept.name!r} to {out} "
          f"({len(concept.forget)} forget + {len(concept.retain)} retain prompts, {time.perf_counter() - start:.1f} s)")
    return 0
