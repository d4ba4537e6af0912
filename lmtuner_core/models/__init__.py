"""Models in and out: generate, evaluate, merge, quantize, GGUF, and vLLM servers."""
