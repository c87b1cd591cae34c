"""Offline vLLM with erasekit in two lines: ``guarded_llm`` and ``erase_params``.

The plugin itself needs no code (stock vLLM loads it through the ``vllm.general_plugins``
entry point; set ``ERASEKIT_CONFIG`` or ``additional_config``). These helpers exist because
the offline path has two easy mistakes: forgetting that vLLM loads plugins once per process
(so the plugin must be registered before the first engine), and building ``extra_args`` by
hand::

    from erasekit.integrations.vllm import guarded_llm, erase_params

    llm = guarded_llm("path/to/model", policy="policy.yaml", max_model_len=2048)
    outs = llm.generate(["Who is Harry Potter?", "What is 2+2?"],
                        [erase_params(["harry_potter"], max_tokens=64), erase_params(max_tokens=64)])
"""

from __future__ import annotations

import os
from typing import Any

from erasekit.integrations.vllm_config import CONFIG_KEY, REQUEST_KEY

__all__ = ["erase_params", "guarded_llm"]


def guarded_llm(model: str | os.PathLike[str], policy: str | os.PathLike[str] | dict[str, Any], **llm_kwargs: Any):
    """``vllm.LLM`` with erasekit configured from ``policy`` (a file path or an inline mapping).

    Start-up fails with an :class:`~erasekit.errors.ErasekitError` for a bad policy, a missing
    or tampered pack, or packs calibrated for another model: the engine never serves
    half-guarded. Every other keyword goes to ``vllm.LLM``.
    """
    from vllm import LLM

    from erasekit.integrations.vllm_plugin import register

    register()  # no-op if vLLM already loaded it in this process
    spec: Any = policy if isinstance(policy, dict) else str(os.path.abspath(os.fspath(policy)))
    extra = dict(llm_kwargs.pop("additional_config", None) or {})
    extra[CONFIG_KEY] = {"policy": spec}
    return LLM(model=os.fspath(model), additional_config=extra, **llm_kwargs)


def erase_params(erase: list[str] | str | dict[str, bool] | None = None, **sampling_kwargs: Any):
    """``vllm.SamplingParams`` asking to erase ``erase`` (on top of the policy's mandatory concepts)."""
    from vllm import SamplingParams

    extra = dict(sampling_kwargs.pop("extra_args", None) or {})
    if erase is not None:
        extra[REQUEST_KEY] = erase
    return SamplingParams(extra_args=extra or None, **sampling_kwargs)
