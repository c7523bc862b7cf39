#!/usr/bin/env bash
# GPU check of mathrl train's CUDA path (bench/gpu_check.py says what it runs and measures):
# a few GRPO steps on SmolLM2-135M and on a random-weight ~1.1B Llama (with and without gradient
# checkpointing), the GPU's bf16 matmul rate, and one table printed at the end (~3 min on an
# H100/H200; each run is capped at --timeout seconds). Nothing is downloaded.
#
#   bash bench/gpu_check.sh            # no CUDA: prints one line, exits 0
#   bash bench/gpu_check.sh --smoke    # the same code path on the CPU with tiny models
#
# It needs torch, transformers, peft, tokenizers, rich, matplotlib, sympy and pyyaml (a GPU image
# with PyTorch usually has them); mathrl itself is taken from this checkout (PYTHONPATH), so
# nothing has to be installed. The table (and gpu_check.md/.json) also go to $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" bench/gpu_check.py "$@"
