#!/usr/bin/env bash
# The GPU path in one go, in under 8 minutes on one GPU: the precision benchmark and the scale=ci suite (without
# notebook 08, which trains on the CPU whatever the device) with --device cuda, in float32 and in bf16.
# Writes one Markdown table to ${OUT:-gpu-check}/gpu_check.md (and each step's log beside it).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, after `make setup TORCH_SPEC=...` (CUDA torch)
set -uo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
NOTEBOOKS="00_quickstart 01_keys 02_values 03_aggregation 06_knowledge_neurons 07_moefication 09_ff_attention_maps 10_corpus_size"
table="$OUT/gpu_check.md"
{
  echo "## GPU check ($(date -u +%F))"
  echo
  "$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {torch.cuda.get_device_name(0)}')"
  echo
} > "$table"

"$PY" benchmarks/bench_precision.py --device cuda --sentences 400 --train-steps 20 > "$OUT/precision.log" 2>&1
grep '^|' "$OUT/precision.log" >> "$table" || echo "bench_precision.py failed: see precision.log" >> "$table"

echo >> "$table"
echo "| suite at scale=ci, --device cuda | seconds | result |" >> "$table"
echo "|---|---|---|" >> "$table"
for precision in float32 bfloat16; do
  start=$(date +%s)
  if timeout 170 "$PY" -m ffnlib.suite --scale ci --device cuda --precision "$precision" --control none \
      --results "$OUT/results" --notebooks $NOTEBOOKS --quiet > "$OUT/suite-$precision.log" 2>&1; then
    result="ok"
  else
    result="failed or timed out (rc $?): see suite-$precision.log"
  fi
  echo "| $precision | $(( $(date +%s) - start )) | $result |" >> "$table"
done
cat "$table"
