"""Section A: the transformers guard on the device.

Packs (MLLMEraser and KIF) are calibrated ON the device (so calibration's CUDA path is exercised
too), the model is guarded, and a mixed batch (half the rows toggled) is checked: untoggled rows'
logits and greedy tokens are bit-identical to the unguarded model, toggled rows differ. fp32
toggled greedy tokens on the device are compared with the same computation on the CPU (agreement
is reported, not asserted: kernels differ). Then generate is timed: unguarded vs guarded with no
toggle vs guarded with half the rows toggled, interleaved, device-synchronised.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_check.common import Section, log, paired_timing

FORGET = [f"Tell me everything about the wizard Zorvath number {i} and his wand" for i in range(12)]
RETAIN = [f"What is {i} plus {i + 3}? Show the sum." for i in range(12)]
# Same hyperparameters as tests/test_llm_guard.py: visible edits on a random model.
MLL_HP = {"strength": -8.0}
KIF_HP = {"gate_tau": -50.0, "suppression": 1.0, "num_layers": 2}

#: model shapes: the test's tiny Llama, and a random Llama with SmolLM2-135M's layer shapes
#: (30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536; byte vocabulary) for GPU overhead numbers
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {},
    "smollm2_shape": {
        "num_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
    },
}


def _prompts(n: int) -> list[str]:
    """n prompts alternating forget-like and retain-like, different lengths (padding on the left)."""
    out = []
    for i in range(n):
        out.append(FORGET[i % len(FORGET)] if i % 2 == 0 else RETAIN[i % len(RETAIN)] + " Thanks" * (i % 3))
    return out


def _toggles(n: int, names: list[str]) -> list[list[str]]:
    """Half the rows toggled: rows 1, 3, 5, ... each get one concept (cycling through ``names``)."""
    return [[names[(i // 2) % len(names)]] if i % 2 == 1 else [] for i in range(n)]


def _calibrate(model: Any, tok: Any, root: Path, tag: str) -> dict[str, str]:
    from erasekit import Concept
    from erasekit.integrations.transformers_calibrate import calibrate

    mll = calibrate(
        model,
        Concept("zorvath", forget=FORGET, retain=RETAIN, keywords=["Zorvath"]),
        "mllmeraser",
        tokenizer=tok,
        progress=False,
        hyperparameters=MLL_HP,
    )
    kif = calibrate(
        model,
        Concept("wands", forget=FORGET, retain=RETAIN),
        "kif",
        tokenizer=tok,
        progress=False,
        hyperparameters=KIF_HP,
    )
    return {
        "zorvath": str(mll.save_pretrained(root / f"{tag}-mll")),
        "wands": str(kif.save_pretrained(root / f"{tag}-kif")),
    }


def _pack_diff(a: str, b: str) -> float:
    """Largest absolute difference between two packs' tensors (same names)."""
    from erasekit import ConceptPack

    pa, pb = ConceptPack.from_pretrained(a), ConceptPack.from_pretrained(b)
    worst = 0.0
    for k, v in pa.tensors.items():
        if v.is_floating_point():
            worst = max(worst, float((v.double() - pb.tensors[k].double()).abs().max()))
        elif not torch.equal(v, pb.tensors[k]):
            worst = float("inf")
    return worst


def _mixed_batch(
    sec: Section,
    model: Any,
    tok: Any,
    packs: dict[str, str],
    device: torch.device,
    label: str,
    n_rows: int,
    new_tokens: int,
) -> dict[str, Any]:
    """Mixed-batch checks on one (model, dtype); returns the toggled rows' greedy tokens."""
    from erasekit.integrations.transformers import TransformersGuard

    prompts = _prompts(n_rows)
    toggles = _toggles(n_rows, sorted(packs))
    on = [i for i, t in enumerate(toggles) if t]
    off = [i for i, t in enumerate(toggles) if not t]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    with torch.inference_mode():
        base_logits = model(**enc).logits
        base_tokens = model.generate(**enc, **kw)
        with TransformersGuard(model, list(packs.values())) as g:
            logits = g(**enc, erase=toggles).logits
            tokens = g.generate(**enc, erase=toggles, **kw)
            benign = g.generate(**enc, **kw)
        after = model(**enc).logits  # detached: exactly the model again
    real = enc["attention_mask"].bool()
    sec.check(
        f"{label}: untoggled rows' logits bit-identical to unguarded",
        torch.equal(logits[off], base_logits[off]),
        "bit-identical",
        rows=len(off),
    )
    sec.check(
        f"{label}: untoggled rows' greedy tokens identical",
        torch.equal(tokens[off], base_tokens[off]),
        "token-identical",
        rows=len(off),
        new_tokens=new_tokens,
    )
    sec.check(
        f"{label}: no toggle at all -> every row's tokens identical",
        torch.equal(benign, base_tokens),
        "token-identical",
    )
    differ = [not torch.allclose(logits[i][real[i]].float(), base_logits[i][real[i]].float()) for i in on]
    sec.check(
        f"{label}: toggled rows' logits differ from unguarded",
        all(differ),
        "all differ",
        rows_differing=sum(differ),
        rows=len(on),
    )
    tok_diff = sum(not torch.equal(tokens[i], base_tokens[i]) for i in on)
    sec.report(f"{label}: toggled rows whose greedy tokens differ", f"{tok_diff}/{len(on)}")
    sec.check(
        f"{label}: detach restores logits bit for bit", torch.equal(after, base_logits), "bit-identical"
    )
    return {
        "toggled_tokens": tokens[on].cpu(),
        "base_tokens": base_tokens.cpu(),
        "prompt_len": enc["input_ids"].shape[1],
    }


def _timing(
    sec: Section,
    model: Any,
    tok: Any,
    packs: dict[str, str],
    device: torch.device,
    label: str,
    n_prompts: int,
    new_tokens: int,
    reps: int,
) -> None:
    from erasekit.integrations.transformers import TransformersGuard

    prompts = _prompts(n_prompts)
    toggles = _toggles(n_prompts, sorted(packs))
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    g = TransformersGuard(model, list(packs.values()), attach=False)

    def unguarded() -> None:
        with torch.inference_mode():
            model.generate(**enc, **kw)

    def guarded(erase: object) -> Any:
        def run() -> None:
            with torch.inference_mode():
                g.generate(**enc, erase=erase, **kw)

        return run

    # the guard stays attached for all variants: "unguarded" calls the model's own generate on a
    # guarded model with nothing mandatory, which is the hook-free path only if detached -> detach
    # around the unguarded variant instead
    def unguarded_detached() -> None:
        g.detach()
        try:
            unguarded()
        finally:
            g.attach()

    g.attach()
    try:
        res = paired_timing(
            {
                "unguarded": unguarded_detached,
                "guarded_no_toggle": guarded(None),
                "guarded_half_toggled": guarded(toggles),
            },
            "unguarded",
            reps,
            device,
        )
    finally:
        g.detach()
    res.update(prompts=n_prompts, new_tokens=new_tokens, hooked_layers=len(g._by_layer))
    sec.report(f"{label}: generate timing", res)


def _run_shape(
    sec: Section, device: torch.device, quick: bool, shape: str, root: Path, compare_cpu: bool
) -> None:
    from erasekit.testing.tiny_llama import build_tiny_llama

    n_rows = 8 if quick else 16
    new_tokens = 8 if quick else 16
    t_prompts, t_tokens, reps = (4, 8, 2) if quick else (16, 64, 5)
    cpu_model, tok = build_tiny_llama(0, **SHAPES[shape])
    sec.report(f"{shape}: parameters", sum(p.numel() for p in cpu_model.parameters()))
    model = build_tiny_llama(0, **SHAPES[shape])[0].to(device)

    def calib() -> dict[str, str]:
        log(f"  A: calibrating MLLMEraser + KIF packs on {device} ({shape})")
        return _calibrate(model, tok, root, f"{shape}-dev")

    packs = sec.guarded(f"{shape}: calibrate on {device}", calib)
    if packs is None:
        return
    sec.check(f"{shape}: MLLMEraser + KIF calibrated on {device}", True, "no error")
    if compare_cpu and shape == "tiny":

        def cpu_vs_device() -> None:
            cpu_packs = _calibrate(cpu_model, tok, root, f"{shape}-cpu")
            for name in packs:
                sec.report(
                    f"{shape}: pack {name} max |{device.type} - cpu| tensor diff",
                    _pack_diff(packs[name], cpu_packs[name]),
                )

        sec.guarded(f"{shape}: cpu calibration compare", cpu_vs_device)

    results: dict[torch.dtype, Any] = {}
    for dtype in (torch.float32, torch.bfloat16):
        label = f"{shape} {str(dtype).removeprefix('torch.')}"
        m = model.to(dtype)
        results[dtype] = sec.guarded(
            f"{label} mixed batch",
            functools.partial(_mixed_batch, sec, m, tok, packs, device, label, n_rows, new_tokens),
        )
        if not quick or dtype == torch.float32:
            sec.guarded(
                f"{label} timing",
                functools.partial(_timing, sec, m, tok, packs, device, label, t_prompts, t_tokens, reps),
            )
    model.to(torch.float32)
    dev = results.get(torch.float32)
    if compare_cpu and dev is not None:

        def agreement() -> None:
            cpu = _mixed_batch(
                Section("A-cpu", "cpu reference"),
                cpu_model,
                tok,
                packs,
                torch.device("cpu"),
                f"{shape} fp32 cpu",
                n_rows,
                new_tokens,
            )
            p = dev["prompt_len"]
            a, b = dev["toggled_tokens"][:, p:], cpu["toggled_tokens"][:, p:]
            sec.report(
                f"{shape} fp32: toggled greedy tokens {device.type} vs cpu, token agreement",
                round(float((a == b).float().mean()), 4),
            )
            sec.report(
                f"{shape} fp32: toggled greedy sequences {device.type} vs cpu, identical",
                f"{int((a == b).all(1).sum())}/{a.shape[0]}",
            )
            ua, ub = dev["base_tokens"][:, p:], cpu["base_tokens"][:, p:]
            sec.report(
                f"{shape} fp32: unguarded greedy tokens {device.type} vs cpu, token agreement (reference)",
                round(float((ua == ub).float().mean()), 4),
            )

        sec.guarded(f"{shape}: cpu agreement", agreement)


def run(sec: Section, device: torch.device, quick: bool, shapes: list[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="gpu_check_llm_"))
    # device vs CPU comparisons; GPU_CHECK_COMPARE_CPU=1 runs them on a CPU run too (self-test of the code)
    compare_cpu = device.type != "cpu" or os.environ.get("GPU_CHECK_COMPARE_CPU") == "1"
    for shape in shapes:
        sec.guarded(
            f"shape {shape}", functools.partial(_run_shape, sec, device, quick, shape, root, compare_cpu)
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
