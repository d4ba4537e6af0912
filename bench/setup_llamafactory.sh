#!/usr/bin/env bash
# LLaMA-Factory in its own venv, as the peer in bench/train_throughput.py (its pins clash with ours).
# Outside the clone, so later runs on the same machine reuse it:
#     bash bench/setup_llamafactory.sh [VENV]     (default ~/.cache/lmtuner/llamafactory-venv)
# On a machine without an NVIDIA GPU, torch stays on the local CPU wheel (constraints-cpu.txt); the CUDA-built
# torchvision is uninstalled and torchaudio's CUDA-built .so files are moved aside, since they break imports
# (LLaMA-Factory's mm_plugin imports torchaudio at top level) and text SFT needs neither.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${LLAMAFACTORY_VENV:-$HOME/.cache/lmtuner/llamafactory-venv}}"
VERSION="${LLAMAFACTORY_VERSION:-0.9.5}"
PYTHON="${PYTHON:-python3}"
CONSTRAINT=()
command -v nvidia-smi >/dev/null 2>&1 || CONSTRAINT=(-c "$HERE/constraints-cpu.txt")

if [ -x "$VENV/bin/llamafactory-cli" ] && "$VENV/bin/python" -c "import llamafactory.train.tuner" 2>/dev/null; then
    echo "LLaMA-Factory venv ready: $VENV"
    exit 0
fi
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${CONSTRAINT[@]}" "llamafactory==$VERSION"
if [ ${#CONSTRAINT[@]} -gt 0 ]; then
    "$VENV/bin/python" -m pip uninstall -q -y torchvision 2>/dev/null || true
    LIB="$("$VENV/bin/python" -c 'import importlib.util, os; s = importlib.util.find_spec("torchaudio"); print(os.path.join(os.path.dirname(s.origin), "lib") if s else "")')"
    if [ -n "$LIB" ] && [ -d "$LIB" ]; then
        mkdir -p "$VENV/torchaudio-cuda-libs"
        find "$LIB" -maxdepth 1 -name '*.so' -exec mv {} "$VENV/torchaudio-cuda-libs/" \;
    fi
fi
"$VENV/bin/python" -c "import llamafactory.train.tuner" || { echo "LLaMA-Factory install failed"; exit 1; }
echo "LLaMA-Factory venv ready: $VENV"
