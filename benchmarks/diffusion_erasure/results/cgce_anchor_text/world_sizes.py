# ruff: noqa
"""Parameter counts of the world's text encoder and UNet: why one extra text-encoder pass is a visible share of a world call.
Usage: ``PYTHONPATH=. python benchmarks/diffusion_erasure/results/cgce_anchor_text/world_sizes.py``."""
import json
from pathlib import Path
from erasekit.testing.diffusion_world import load_world

pipe = load_world().pipe
out = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("text_encoder", "unet")}
print(json.dumps(out))
Path(__file__).with_name("world_sizes.json").write_text(json.dumps(out, indent=1) + "\n")
