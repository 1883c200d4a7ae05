#!/bin/bash
# On the CUDA machine, in the repository root: unpack the parts that build.sh wrote (in PARTS_DIR) into
# /tmp/vllm-site and run bench/vllm_check.py with it (and, with WITH_TESTS=1, the suite's GPU tests of the vLLM
# engine); the logs and JSON go to RESULTS_DIR.
#   [WITH_TESTS=1] bash bench/vllm_offline/run.sh PARTS_DIR [RESULTS_DIR]
set -uo pipefail
PARTS="$1"
RESULTS="${2:-bench/results}"
START=$SECONDS
SITE=/tmp/vllm-site
mkdir -p "$SITE" "$RESULTS"
if [ -f "$PARTS/site.sha256" ] && [ "$(cat "$PARTS"/part-* | sha256sum | cut -d' ' -f1)" != "$(cat "$PARTS/site.sha256")" ]; then
  echo "[vllm-offline] the parts in $PARTS do not match site.sha256 (one missing or cut short?)"; exit 3
fi
cat "$PARTS"/part-* | xz -d -T0 | tar -x -C "$SITE" || { echo "[vllm-offline] unpacking failed"; exit 3; }
echo "[vllm-offline] unpacked in $((SECONDS - START)) s"
export PYTHONPATH="$SITE:$PWD/src" PYTHONUNBUFFERED=1 INCENTIVE_KERNELS=0 HF_HUB_OFFLINE=1
export VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, vllm; print('[vllm-offline] torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__, 'cuda', torch.cuda.is_available())"
python3 bench/vllm_check.py --out "$RESULTS/vllm_check_cuda.json" 2>&1 | tee "$RESULTS/vllm_check.log" | grep -v "it/s\]"
status=${PIPESTATUS[0]}
if [ "${WITH_TESTS:-0}" = 1 ]; then  # the same checks as the GPU tests of the suite (~3 more minutes)
  python3 -m pytest -q -p no:cacheprovider tests/test_vllm_engine.py -k real 2>&1 | tee "$RESULTS/vllm_tests.log" | tail -15
  status=$(( status | PIPESTATUS[0] ))
fi
echo "[vllm-offline] done in $((SECONDS - START)) s, exit status $status"
exit "$status"
