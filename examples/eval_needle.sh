#!/bin/bash
# Needle-in-a-haystack evaluation of a trained checkpoint (Fu et al. 2024's grid): 40 context
# lengths evenly spaced from 1000 to 128000 tokens x 10 needle depths (0..100%), greedy decoding;
# tools/eval_needle.py writes the scores and the heatmap into $OUTPUT_DIR.
#
#   MODEL=runs/llama2-7b-128k/hf TOKENIZER_MODEL=/models/Llama-2-7b-hf sbatch examples/eval_needle.sh
#
# One task on one node: at 128K a 7B model needs 13.5 GB of bf16 weights plus a 64 GiB KV cache
# (32 layers x 2 x 4096 x 2 B per token), more than one 80 GB H100 holds with activations, so
# the tool gets the node's GPUs to spread layers over.
#
#SBATCH --job-name=longctx-needle
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=08:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-$REPO_DIR/runs/llama2-7b-128k/hf}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-/models/Llama-2-7b-hf}
OUTPUT_DIR=${OUTPUT_DIR:-$REPO_DIR/runs/llama2-7b-128k/needle}
NUM_LENGTHS=${NUM_LENGTHS:-40}
MIN_LENGTH=${MIN_LENGTH:-1000}
MAX_LENGTH=${MAX_LENGTH:-128000}
DEPTHS=${DEPTHS:-10}
read -r -a EXTRA_ARGS <<< "${EXTRA_ARGS:-}"

# LENGTHS (space-separated) overrides the evenly spaced grid.
if [[ -n ${LENGTHS:-} ]]; then
  read -r -a LENGTH_LIST <<< "$LENGTHS"
else
  LENGTH_LIST=()
  for (( i = 0; i < NUM_LENGTHS; i++ )); do
    # round(MIN + i * (MAX - MIN) / (NUM - 1)) in integer arithmetic
    LENGTH_LIST+=($(( MIN_LENGTH + (2 * i * (MAX_LENGTH - MIN_LENGTH) + NUM_LENGTHS - 1)
                      / (2 * (NUM_LENGTHS - 1)) )))
  done
fi

MODEL_FLAGS=(--model "$MODEL" --tokenizer-model "$TOKENIZER_MODEL")
GRID_FLAGS=(--lengths "${LENGTH_LIST[@]}" --depths "$DEPTHS")
OUTPUT_FLAGS=(--output-dir "$OUTPUT_DIR")

mkdir -p "$OUTPUT_DIR"
printf '%q ' "$PYTHON" "$REPO_DIR/tools/eval_needle.py" "${MODEL_FLAGS[@]}" "${GRID_FLAGS[@]}" \
  "${OUTPUT_FLAGS[@]}" "${EXTRA_ARGS[@]}" > "$OUTPUT_DIR/command.sh"
echo >> "$OUTPUT_DIR/command.sh"
exec "$PYTHON" "$REPO_DIR/tools/eval_needle.py" "${MODEL_FLAGS[@]}" "${GRID_FLAGS[@]}" \
  "${OUTPUT_FLAGS[@]}" "${EXTRA_ARGS[@]}"
