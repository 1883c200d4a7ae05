#!/bin/bash
# Build an offline vLLM site for a CUDA machine that has no internet (see README.md here):
#   bash bench/vllm_offline/build.sh [OUT_DIR] [PART_BYTES]
# writes OUT_DIR/part-0, part-1, ... (one xz-compressed tar of the site, split) and OUT_DIR/site.sha256.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-$HOME/.cache/incentive/vllm-offline}"
PART_BYTES="${2:-62000000}"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PLATFORMS=()
for tag in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
           manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
echo "[vllm-offline] downloading $(grep -c '==' "$HERE/requirements.txt") wheels for cp312"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$WORK/wheels" -r "$HERE/requirements.txt"
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WORK"/wheels/*.whl
# Kernels offline generation of an fp32 or head-size-16 model never loads (vLLM then picks Triton or Flex
# attention), and vLLM's Rust front end: 600 MB of the 750 MB wheel. The required _C library stays.
rm -f "$WORK"/site/vllm/vllm_flash_attn/*.so "$WORK"/site/vllm/_flashmla*.so "$WORK"/site/vllm/_qutlass_C.abi3.so \
  "$WORK"/site/vllm/_moe_C_stable_libtorch.abi3.so "$WORK"/site/vllm/vllm-rs
rm -rf "$WORK"/site/vllm/third_party/deep_gemm "$WORK"/site/vllm/third_party/fmha_sm100 "$WORK"/site/bin
find "$WORK/site" -name __pycache__ -prune -exec rm -rf {} +
echo "[vllm-offline] site: $(du -sh "$WORK/site" | cut -f1); compressing"
mkdir -p "$OUT"
rm -f "$OUT"/part-*
tar -cf - -C "$WORK/site" . | xz -T0 -6 > "$WORK/site.tar.xz"
(cd "$WORK" && sha256sum site.tar.xz | cut -d' ' -f1) > "$OUT/site.sha256"
split -b "$PART_BYTES" -d -a 1 "$WORK/site.tar.xz" "$OUT/part-"
ls -l "$OUT"
