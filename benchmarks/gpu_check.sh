#!/usr/bin/env bash
# The checks that need a GPU, as one short script (a few minutes on one H100/H200):
#  1. the efficiency benchmark at real BLIP size (blip-vqa-base architecture, random weights);
#  2. one real worker run on CUDA whose epoch_end events must carry NVML and CUDA figures (exit 1 if not).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (needs the package installed, see README)
set -euo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

for bs in 16 32; do
  python benchmarks/efficiency.py --model blip-vqa-base-random --device cuda --batch-size "$bs" \
    --steps 20 --warmup 3 --rounds 3 --methods sft,orpo,dpo-copy,dpo-precompute,ipo-copy,kto-copy,simpo \
    | tee "$out/efficiency-bs$bs.md"
done
python benchmarks/efficiency.py --model blip-vqa-base-random --device cuda --batch-size 16 --bf16 \
  --steps 20 --warmup 3 --rounds 3 --methods sft,orpo,dpo-copy,dpo-precompute | tee "$out/efficiency-bs16-bf16.md"

# A real worker on CUDA: NVML telemetry and CUDA peaks must be numbers, not null.
VQABENCH_CACHE="$out/cache" vqabench --headless --preset sft,dpo-beta0.1,orpo --limit 512 --epochs 2 \
  --set device=cuda --results "$out/results" --export "$out/report.md" | tail -30
python - "$out/results" <<'PY'
import sys
from vqabench.store import ResultsStore
missing = []
with ResultsStore(sys.argv[1], create=False) as store:
    session = store.last_session()
    for run in store.runs(session.id):
        epochs = store.epochs(run.id)
        if not epochs:
            missing.append(f"{run.name}: no epoch recorded ({run.status})")
        for e in epochs:
            fields = ("cuda_max_allocated_mib", "gpu_process_peak_mib", "gpu_device_peak_mib", "gpu_util_mean",
                      "gpu_power_mean_w")
            print(run.name, e.epoch, {f: getattr(e, f) for f in fields})
            if e.cuda_max_allocated_mib is None:
                missing.append(f"{run.name} epoch {e.epoch}: no CUDA memory figure")
            if e.gpu_process_peak_mib is None and e.gpu_device_peak_mib is None:
                missing.append(f"{run.name} epoch {e.epoch}: no NVML memory figure")
if missing:
    sys.exit("gpu_check: FAILED, the epoch events lack GPU figures: " + "; ".join(missing))
print("gpu_check: every epoch carries CUDA and NVML memory figures")
PY

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
