#!/usr/bin/env bash
# Install llama-cpp-python (llama.cpp's reference quantizer, loader and server) with its server extra.
# PyPI ships it as source only: the first run builds a wheel (~7-20 min on 2 cores) and keeps it in a cache
# keyed by the CPU (the build uses this machine's instruction set), so later runs install in seconds.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
if python - "$VERSION" <<'PY' 2>/dev/null; then exit 0; fi
import sys, llama_cpp
sys.exit(0 if llama_cpp.__version__ == sys.argv[1] else 1)
PY
cpu_key="$(uname -m)-$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-12)"
CACHE="${LOWBIT_WHEEL_CACHE:-$HOME/.cache/lowbit/wheels}/llama-cpp-python/$cpu_key"
mkdir -p "$CACHE"
whl="$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)"
if [ -z "$whl" ]; then
    echo "building llama-cpp-python $VERSION (once per machine; cached in $CACHE)" >&2
    CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF}" \
        CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        python -m pip wheel -q --no-deps -w "$CACHE.partial" "llama-cpp-python==$VERSION"
    mv "$CACHE.partial"/llama_cpp_python-"$VERSION"-*.whl "$CACHE"/
    rmdir "$CACHE.partial" 2>/dev/null || true
    whl="$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -1)"
fi
python -m pip install -q "${whl}[server]"
