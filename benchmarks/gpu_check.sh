#!/usr/bin/env bash
# The checks that need a GPU, as one asserting script (about 15 minutes on one H100/H200):
# NVML and CUDA memory figures non-null and ordered, again under CUDA_VISIBLE_DEVICES=<uuid>,
# the real-size random BLIP with a precomputed reference, a forced OOM that must end as
# error_kind "memory", and every method's step under torch.cuda.set_sync_debug_mode("error");
# then LoRA and mixed precision, and real-size Qwen2-VL LoRA DPO (2B, and 7B within 40 GB).
# The logic is benchmarks/gpu_check.py (its checks are unit-tested on the CPU); this prints
# the device, runs it, and exits non-zero on any violation.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (from the repository root, package installed)
# DEVICE=cpu PRECISION=fp32 QWEN2VL_2B=qwen2-vl-tiny-random QWEN2VL_7B=qwen2-vl-tiny-random runs only the
# Qwen2-VL LoRA DPO block, on the CPU: a smoke test of its path (PROBE_STEPS=1 PROBE_ROUNDS=1 shortens it).
set -euo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
device=${DEVICE:-cuda}
if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=name,uuid,memory.total,driver_version,mig.mode.current --format=csv,noheader \
    | tee "$out/gpu.txt"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
  timeout 480 python benchmarks/gpu_check.py --out "$out" | tee "$out/summary.md"
fi

# ---- i13dist (issue 13): one run on 2 processes (torchrun + DDP, NCCL), when two GPUs are visible ----
# Kept as its own block so the GPU-readiness rewrite of this script can move it as a whole.
gpu_count=0
[ "$device" != cuda ] || gpu_count=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
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
[ "$device" != cuda ] || bash benchmarks/gpu_lora_check.sh "$out/lora"

# ---- Real-size Qwen2-VL LoRA DPO (issue 24), random weights, the adapter reference (beside LoRA SFT, ----
# the DPO preset's start and the probe's ms/step baseline).
# Each probe must finish every round; benchmarks/probe_check.py prints ms/step and the peak (CUDA max
# allocated) and fails a peak over its limit; `vqabench probe --memory` prints the estimate beside it.
#  a) Qwen2-VL-2B's architecture, batch 8;
#  b) Qwen2-VL-7B's architecture, batch 8, the tower frozen (lora), its features cached, one prompt pass
#     for both answers, logits only at the answers, each decoder MLP recomputed in backward
#     (activation_checkpointing = "mlp"): the issue's target is a peak within 40 GB on one GPU
#     (LLaMA-Factory's 7B LoRA DPO runs out of memory on 8xA100-80G, its #5722).
py=${PYTHON:-python}
precision=${PRECISION:-bf16}
status=0
source "$(dirname "$0")/gpu_probe.sh"  # preset and probe, shared with gpu_families.sh
checked_probe() {  # checked_probe NAME MAX_PEAK_GB|- MODEL TRAIN BATCH SPEC...
  local name=$1 limit=()
  [ "$2" = - ] || limit=(--max-peak-gb "$2")
  shift 2
  probe "$name" "$@"
  $py -m vqabench.cli probe --memory --preset "$probe_selection" --steps "${PROBE_STEPS:-5}" \
    --warmup "${PROBE_WARMUP:-2}" --results "$out/results-probe-$name" | tee "$out/memory-$name.txt" || status=1
  $py benchmarks/probe_check.py "$out/results-probe-$name" "${limit[@]}" | tee "$out/check-$name.txt" || status=1
}
checked_probe qwen2vl2b-lora-dpo - "${QWEN2VL_2B:-qwen2-vl-2b-random}" lora 8 sft dpo:adapter
PROBE_TIMEOUT=${PROBE_TIMEOUT:-480} checked_probe qwen2vl7b-lora-dpo 40 "${QWEN2VL_7B:-qwen2-vl-7b-random}" lora 8 \
  sft dpo:adapter 'encoder_cache = "on"' 'shared_prompt = true' 'answer_only_logits = true' \
  'activation_checkpointing = "mlp"'
exit $status
