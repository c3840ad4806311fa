#!/usr/bin/env bash
# LoRA and mixed precision on a GPU (issue 15), called by gpu_check.sh; a few minutes on one H100/H200:
#  1. at real BLIP size (blip-vqa-base architecture, random weights): full-decoder DPO with a copied
#     reference against LoRA DPO with the adapter reference (ms/step, CUDA peak, optimizer state,
#     reference bytes), and SFT in fp32 against bf16 and fp16 (fp16 runs with a GradScaler);
#  2. the LoRA presets in real workers on CUDA in bf16 and fp16: every run must finish, the DPO run
#     must report 0 reference bytes.
# Usage: bash benchmarks/gpu_lora_check.sh [OUT_DIR]   (needs the package installed, see README)
set -euo pipefail
out=${1:-gpu-check/lora}
mkdir -p "$out"

python benchmarks/efficiency.py --model blip-vqa-base-random --device cuda --batch-size 16 \
  --steps 20 --warmup 3 --rounds 3 --methods sft,sft-bf16,sft-fp16,dpo-copy,dpo-lora-adapter,sft-lora,orpo-lora \
  | tee "$out/efficiency-lora-bs16.md"

for precision in bf16 fp16; do
  VQABENCH_CACHE="$out/cache" vqabench --headless --preset lora --limit 512 --epochs 1 \
    --set device=cuda --set precision="$precision" --set judge=exact --results "$out/results-$precision" \
    --export "$out/report-$precision.md" | tail -20
  python - "$out/results-$precision" "$precision" <<'PY'
import sys
from vqabench.store import ResultsStore
with ResultsStore(sys.argv[1], create=False) as store:
    runs = store.runs(store.last_session().id)
    assert runs and all(r.status == "done" for r in runs), [(r.name, r.status, r.reason) for r in runs]
    for run in runs:
        assert (run.started.train, run.started.precision) == ("lora", sys.argv[2]), run.name
        if run.method == "dpo":
            assert run.started.reference_strategy == "adapter" and run.started.reference_bytes == 0
        epochs = store.epochs(run.id)
        print(run.name, sys.argv[2], "trainable", run.started.trainable_params,
              "optimizer MiB", round(epochs[0].optimizer_state_bytes / 2**20, 1),
              "CUDA peak MiB", epochs[0].cuda_max_allocated_mib)
PY
done
