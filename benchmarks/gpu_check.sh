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

# ---- i13dist (issue 13): one run on 2 processes (torchrun + DDP, NCCL), when two GPUs are visible ----
# Kept as its own block so the GPU-readiness rewrite of this script can move it as a whole.
gpu_count=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
if [ "$gpu_count" -ge 2 ]; then
  VQABENCH_CACHE="$out/cache" vqabench --headless --preset sft --limit 512 --epochs 2 --gpus 0,1 \
    --set nproc_per_node=2 --set batch_size=32 --results "$out/results-ddp" | tail -15
  python - "$out/results-ddp" <<'PY'
import sys
from vqabench.store import ResultsStore
with ResultsStore(sys.argv[1], create=False) as store:
    [run] = store.runs(store.last_session().id)
    s = run.started
    assert run.status == "done", run.reason
    assert (s.world_size, s.backend, s.per_device_batch) == (2, "nccl", 16), (s.world_size, s.backend)
    for e in store.epochs(run.id):
        assert e.rank_peak_mib and len(e.rank_peak_mib) == 2 and all(p is not None for p in e.rank_peak_mib), e
        print("ddp epoch", e.epoch, "per-rank CUDA peaks", e.rank_peak_mib, "max", e.rank_peak_max_mib,
              "sum", e.rank_peak_sum_mib)
PY
else
  echo "skipping the 2-process DDP run: $gpu_count GPU visible, it needs 2"
fi

# ---- LoRA and mixed precision (issue 15): its own script, kept separate so it can be run alone. ----
bash benchmarks/gpu_lora_check.sh "$out/lora"
