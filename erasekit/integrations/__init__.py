"""Where hooks attach in diffusers, transformers and vLLM. Knows frameworks, not methods."""
