#!/usr/bin/env bash
# The real clients the strict test run (LOWBIT_STRICT_TESTS=1) checks our artifacts with, beyond the dev extra:
# - Go (its text/template runs the Ollama Modelfile templates, tests/test_serve.py), from Debian if missing;
# - compressed-tensors 0.18.0 in .venv-ct018 (sharing every other package with this interpreter): the last
#   release that reads `actorder: group` (GPTQ's g_idx) artifacts; 0.19 removed that. tests/test_artifacts.py
#   finds it there (or at $LOWBIT_CT_GROUP_PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v go >/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq golang-go >/dev/null
fi
if [ ! -x .venv-ct018/bin/python ] || ! .venv-ct018/bin/python -c \
        "import compressed_tensors as c, sys; sys.exit(c.__version__ != '0.18.0')" 2>/dev/null; then
    python -m venv --system-site-packages .venv-ct018
    .venv-ct018/bin/python -m pip install -q --no-deps compressed-tensors==0.18.0
fi
