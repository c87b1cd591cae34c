# ruff: noqa
"""How much of the world's bf16 re-encoding is autocast casting the text encoder's weights, and what keeping
the casts (``CastWeights``) saves. The pass is the guard's own (``DiffusersGuard._encode_prompts``) on 4 "dots"
prompts with the anchor text, 1 thread: median ms over 40 calls in float32, bf16 autocast, and bf16 with cast
weights, plus the torch profiler's share of ``aten::_to_copy`` in the plain autocast pass.
Usage: ``PYTHONPATH=. python benchmarks/diffusion_erasure/results/cgce_anchor_bf16/cast_profile.py``; writes
``cast_profile.json`` beside this file."""
import json, pathlib, statistics, time
import torch
torch.set_num_threads(1)
from torch.profiler import profile
from benchmarks import diffusion_erasure as de
from erasekit.integrations.cast_weights import CastWeights
from erasekit.integrations.diffusers import _CallState, guard
from erasekit.testing.diffusion_world import load_world

with de.quiet_libraries():
    w = load_world(); w.pipe.set_progress_bar_config(disable=True)
    fields = {"prompt": [p + " " + w.anchor_text("dots") for p in w.direct_prompts("dots", 4, 3)]}
    like = torch.zeros(4, w.pipe.tokenizer.model_max_length, w.pipe.text_encoder.config.hidden_size)
    state = _CallState(None, frozenset(), 1)
    res = {}
    for name, dtype, keep in (("float32", None, False), ("bf16_autocast", "bfloat16", False), ("bf16_cast_weights", "bfloat16", True)):
        g = guard(w.pipe, [], anchor_text_dtype=dtype)
        if dtype and not keep:  # plain autocast: a fresh cache every call, so the weights are cast every call
            g._cast_weights.swapped = lambda roots: __import__("contextlib").nullcontext()
        run = lambda: g._encode_prompts(state, fields, like)
        for _ in range(5):
            run()
        times = []
        for _ in range(40):
            t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
        res[name + "_ms"] = 1e3 * statistics.median(times)
        if name == "bf16_autocast":
            with profile() as prof:
                for _ in range(5):
                    run()
            ev = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
            res["bf16_autocast_cast_share"] = (ev.get("aten::copy_", 0) + ev.get("aten::_to_copy", 0)) / sum(ev.values())
        g.detach()
(pathlib.Path(__file__).parent / "cast_profile.json").write_text(json.dumps(res, indent=1) + "\n")
print(json.dumps(res, indent=1))
