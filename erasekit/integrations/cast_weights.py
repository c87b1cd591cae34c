"""Low-precision copies of a model's ``nn.Linear`` weights, kept across autocast passes.

Under ``torch.autocast`` every float32 weight is cast to the autocast dtype on every call, and the
casts are dropped when the context exits, so a pass that runs once per request (the diffusers
guard's ``anchor_text`` re-encoding on CPU) pays them every time. Swapping in copies made once gives
the same values autocast would have made (a float32 tensor cast to bf16 rounds the same way each
time) without that cost (on the world: 12.7 -> 10.8 ms per re-encoding,
``benchmarks/diffusion_erasure/results/cgce_anchor_bf16/cast_profile.py``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import nn


class CastWeights:
    """``dtype`` copies of the float32 ``nn.Linear`` weights and biases under some modules.

    Use :meth:`swapped` around an autocast pass: inside it those layers hold the copies, and on exit
    they hold their own parameters again. A copy is remade when its parameter is replaced or edited in
    place (LoRA fusing bumps the version counter). Layers of other types, non-float32 parameters and
    modules managed by accelerate hooks (offloading moves their weights between devices) are left
    alone, so autocast casts those as usual.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        #: id(parameter) -> (weak reference to it, its version and device when copied, the copy)
        self._copies: dict[int, tuple[weakref.ref, int, torch.device, nn.Parameter]] = {}

    def _copy(self, param: nn.Parameter) -> nn.Parameter:
        hit = self._copies.get(id(param))
        if hit is not None:
            ref, version, device, copy = hit
            if ref() is param and version == param._version and device == param.device:
                return copy
        # a miss may follow replaced parameters: drop every copy whose parameter is gone
        self._copies = {k: v for k, v in self._copies.items() if v[0]() is not None}
        copy = nn.Parameter(param.detach().to(self.dtype), requires_grad=False)
        self._copies[id(param)] = (weakref.ref(param), param._version, param.device, copy)
        return copy

    @contextlib.contextmanager
    def swapped(self, roots: Iterable[nn.Module]) -> Iterator[None]:
        """The layers under ``roots`` hold the low-precision copies inside the block."""
        saved: list[tuple[nn.Module, str, nn.Parameter]] = []
        try:
            for root in roots:
                layers = list(root.modules())
                if any(hasattr(m, "_hf_hook") for m in layers):
                    continue
                for layer in layers:
                    if type(layer) is not nn.Linear:
                        continue
                    for name in ("weight", "bias"):
                        param = layer._parameters.get(name)
                        if param is None or param.dtype != torch.float32:
                            continue
                        saved.append((layer, name, param))
                        layer._parameters[name] = self._copy(param)
            yield
        finally:
            for layer, name, param in reversed(saved):
                layer._parameters[name] = param

    def __len__(self) -> int:
        return len(self._copies)
