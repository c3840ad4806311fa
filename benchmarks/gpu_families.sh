#!/usr/bin/env bash
# The model families on one CUDA GPU (issue 23), a few minutes on an H100/H200:
#  1. every tiny family end to end in real workers, bf16 on CUDA: SFT, then DPO (copy reference)
#     from SFT's checkpoint, then ORPO; every run must finish, in bf16, with finite losses;
#  2. at real size, random weights, bf16: the probe's interleaved step cost and CUDA peak memory of
#     SmolVLM-256M (language model trained; SFT, DPO copy, DPO precompute, ORPO) and Qwen2-VL-2B
#     (LoRA; SFT, DPO with the adapter reference, ORPO).
# Usage: bash benchmarks/gpu_families.sh [OUT_DIR]   (from the repository root, package importable)
set -uo pipefail
out=${1:-gpu-families}
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}  # DEVICE=cpu PRECISION=fp32 PROBE=0 smoke-tests the script without a GPU
precision=${PRECISION:-bf16}
status=0

# preset FILE METHOD MODEL TRAIN EXTRA... and probe NAME MODEL TRAIN BATCH SPEC...
source "$(dirname "$0")/gpu_probe.sh"

# ---- 1. tiny families end to end on CUDA ----
tiny="$out/tiny"
mkdir -p "$tiny"
names=()
for variant in $($py -c "from vqabench.models import registry; print(' '.join(v.name for v in registry.variants().values() if v.name.endswith('-tiny-random')))"); do
  family=${variant%-tiny-random}
  family=${family//./}
  common=('limit = 256' 'epochs = 1' 'batch_size = 16' 'lr = 1e-3')
  preset "$tiny/$family-sft.toml" sft "$variant" lm "${common[@]}"
  preset "$tiny/$family-dpo.toml" dpo "$variant" lm "${common[@]}" "after = \"$family-sft\"" 'reference = "copy"'
  preset "$tiny/$family-orpo.toml" orpo "$variant" lm "${common[@]}"
  names+=("$tiny/$family-sft.toml" "$tiny/$family-dpo.toml" "$tiny/$family-orpo.toml")
done
selection=$(IFS=,; echo "${names[*]}")
timeout 240 $py -m vqabench.cli --headless --preset "$selection" --parallel "${PARALLEL:-3}" --results "$out/results-tiny" \
  --export "$out/report-tiny.md" --no-figures >"$out/tiny.log" 2>&1 || status=1
tail -40 "$out/tiny.log"
$py - "$out/results-tiny" "$precision" "$device" <<'PY' || status=1
import math
import sys

from vqabench.store import ResultsStore

with ResultsStore(sys.argv[1], create=False) as store:
    runs = store.runs(store.last_session().id)
    bad = [(r.name, r.status, r.reason) for r in runs if r.status != "done"]
    print(f"{len(runs) - len(bad)} of {len(runs)} tiny-family runs done ({sys.argv[3]}, {sys.argv[2]})")
    assert runs and not bad, bad
    for run in runs:
        assert run.started.precision == sys.argv[2] and run.started.device.startswith(sys.argv[3]), run.name
        if run.method == "dpo":
            first = store.epochs(run.id)[0]
            print(run.name, "reference MiB", run.started.reference_bytes / 2**20, "epoch-1 train loss", first.train_loss)
            assert run.started.reference_bytes > 0 and math.isfinite(first.train_loss), (run.name, first.train_loss)
PY

# ---- 2. real size, random weights: the interleaved probe on CUDA ----
if [ "${PROBE:-1}" = 1 ]; then
  probe smolvlm smolvlm-256m-random lm 8 sft dpo:copy dpo:precompute orpo
  probe qwen2vl qwen2-vl-2b-random lora 4 sft dpo:adapter orpo
fi
exit $status
