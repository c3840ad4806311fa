#!/usr/bin/env bash
# The checks that need a GPU, as one short script (a few minutes on one H100/H200):
#  1. the efficiency benchmark at real BLIP size (blip-vqa-base architecture, random weights);
#  2. one real worker run on CUDA whose epoch_end events must carry NVML and CUDA figures.
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
with ResultsStore(sys.argv[1], create=False) as store:
    session = store.last_session()
    for run in store.runs(session.id):
        for e in store.epochs(run.id):
            fields = ("cuda_max_allocated_mib", "gpu_process_peak_mib", "gpu_device_peak_mib", "gpu_util_mean",
                      "gpu_power_mean_w")
            print(run.name, e.epoch, {f: getattr(e, f) for f in fields})
PY

# ---- LoRA and mixed precision (issue 15): its own script, kept separate so it can be run alone. ----
bash benchmarks/gpu_lora_check.sh "$out/lora"
