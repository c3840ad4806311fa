# Sourced (not run) by gpu_families.sh and gpu_check.sh: write presets and time them with `vqabench probe`.
# The caller sets out (the output folder), py (the Python), device, precision and status (0; a failed
# probe sets it to 1). PROBE_STEPS, PROBE_ROUNDS, PROBE_WARMUP and PROBE_TIMEOUT override the probe's
# size (a CPU smoke test shrinks them).

preset() {  # preset FILE METHOD MODEL TRAIN EXTRA...
  local file=$1 method=$2 model=$3 train=$4
  shift 4
  {
    echo "method = \"$method\""
    echo "model = \"$model\""
    echo "train = \"$train\""
    echo 'dataset = { source = "easyvqa", eval_size = 64, test_size = 200 }'
    echo 'judge = "exact"'
    echo "device = \"$device\""
    echo "precision = \"$precision\""
    for line in "$@"; do echo "$line"; done
  } >"$file"
}

# probe NAME MODEL TRAIN BATCH SPEC...: one probe session over one preset per SPEC, in
# $out/results-probe-NAME. A SPEC is METHOD or METHOD:REFERENCE (after NAME-sft: list sft too), or a
# preset line KEY = VALUE that every preset gets. Leaves the selection in probe_selection.
probe() {
  local name=$1 model=$2 train=$3 batch=$4
  shift 4
  local dir="$out/presets-$name" files=() lines=() methods=() spec
  for spec in "$@"; do
    if [[ $spec == *=* ]]; then lines+=("$spec"); else methods+=("$spec"); fi
  done
  mkdir -p "$dir"
  for spec in "${methods[@]}"; do  # method[:reference]
    local method=${spec%%:*} reference=${spec#*:} file
    file="$dir/$name-${spec//:/-}.toml"
    if [ "$method" = "$spec" ]; then
      preset "$file" "$method" "$model" "$train" "batch_size = $batch" 'limit = 256' "${lines[@]}"
    else
      preset "$file" "$method" "$model" "$train" "batch_size = $batch" 'limit = 256' "${lines[@]}" \
        "after = \"$name-sft\"" "reference = \"$reference\""
    fi
    files+=("$file")
  done
  probe_selection=$(IFS=,; echo "${files[*]}")
  timeout "${PROBE_TIMEOUT:-200}" $py -m vqabench.cli probe --preset "$probe_selection" --steps "${PROBE_STEPS:-5}" \
    --rounds "${PROBE_ROUNDS:-3}" --warmup "${PROBE_WARMUP:-2}" --results "$out/results-probe-$name" \
    >"$out/probe-$name.md" 2>"$out/probe-$name.err" || status=1
  cat "$out/probe-$name.md"
  tail -5 "$out/probe-$name.err"
}
