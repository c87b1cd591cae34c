import os

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def pipe():
    """A tiny random StableDiffusionPipeline (seed 0), a fresh one per test module: the diffusers guard
    tests share it within a module (hooks attach and detach on it) and never across modules."""
    from erasekit.testing import build_tiny_sd_pipeline

    return build_tiny_sd_pipeline(0)
