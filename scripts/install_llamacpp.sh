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
# x86: an explicit instruction list from /proc/cpuinfo instead of -march=native, without AMX: llama.cpp's AMX
# buffer type segfaults in its first matmul on some Sapphire Rapids machines and VMs (ggml-org/llama.cpp#20824;
# seen here with llama-cpp-python 0.3.36 on SmolLM2 Q4_1). Elsewhere (arm64) the native build.
flags=" $(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
ggml_isa=""
if [ "$(uname -m)" = x86_64 ]; then
    ggml_isa="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    for pair in sse4_2:SSE42 avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
                avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
        case "$flags" in *" ${pair%%:*} "*) ggml_isa="$ggml_isa -DGGML_${pair#*:}=ON" ;; *) ggml_isa="$ggml_isa -DGGML_${pair#*:}=OFF" ;; esac
    done
fi
cpu_key="$(uname -m)-$(printf '%s|%s' "$flags" "$ggml_isa" | sha256sum | cut -c1-12)"
CACHE="${LOWBIT_WHEEL_CACHE:-$HOME/.cache/lowbit/wheels}/llama-cpp-python/$cpu_key"
mkdir -p "$CACHE"
whl="$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)"
if [ -z "$whl" ]; then
    echo "building llama-cpp-python $VERSION (once per machine; cached in $CACHE)" >&2
    CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF $ggml_isa}" \
        CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        python -m pip wheel -q --no-deps --no-cache-dir -w "$CACHE.partial" "llama-cpp-python==$VERSION"
    mv "$CACHE.partial"/llama_cpp_python-"$VERSION"-*.whl "$CACHE"/
    rmdir "$CACHE.partial" 2>/dev/null || true
    whl="$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -1)"
fi
python -m pip install -q "${whl}[server]"
