"""LLM unlearning benchmark: MLLMEraser and KIF on SmolLM2-135M and a tiny fictitious-facts LM."""
