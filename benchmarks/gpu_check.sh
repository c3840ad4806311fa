#!/usr/bin/env bash
# The checks that need a GPU, as one asserting script (under 8 minutes on one H100/H200):
# NVML and CUDA memory figures non-null and ordered, again under CUDA_VISIBLE_DEVICES=<uuid>,
# the real-size random BLIP with a precomputed reference, a forced OOM that must end as
# error_kind "memory", and every method's step under torch.cuda.set_sync_debug_mode("error").
# The logic is benchmarks/gpu_check.py (its checks are unit-tested on the CPU); this prints
# the device, runs it, and exits non-zero on any violation.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (from the repository root, package installed)
set -euo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
nvidia-smi --query-gpu=name,uuid,memory.total,driver_version,mig.mode.current --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
timeout 480 python benchmarks/gpu_check.py --out "$out" | tee "$out/summary.md"
