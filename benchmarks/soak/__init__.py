"""Server soak: a storm of mixed valid, invalid, streaming and cancelled requests against the
OpenAI-compatible vLLM server with erasekit loaded, measuring what must never happen (5xx,
engine restarts, 400s without the parameter named, mandatory bypasses, cross-request leaks)."""
