#!/usr/bin/env bash
# A command with the CPU kernels built under AddressSanitizer: a native read or write out of
# bounds (a kernel's own, or one a caller's bad slot or pointer leads to) stops the process with
# a report on stderr.
#   bash scripts/sanitize.sh .venv/bin/python -m pytest tests/kernels tests/runner
# The sanitizer's runtime must be the first library a process loads, so it is preloaded (with
# libstdc++, whose exceptions it intercepts); the servers and benchmarks a test starts inherit
# it. Leak checks are off: a Python process keeps much of its memory to the end by design.
set -euo pipefail
cxx=${CXX:-g++}
runtime=$(readlink -f "$("$cxx" -print-file-name=libasan.so)")
stdcxx=$(readlink -f "$("$cxx" -print-file-name=libstdc++.so)")
[ -f "$runtime" ] || { echo "no AddressSanitizer runtime for $cxx" >&2; exit 1; }
export RADIXLM_SANITIZE=address
export LD_PRELOAD="$runtime $stdcxx${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
exec "$@"
