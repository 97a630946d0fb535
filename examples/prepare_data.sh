#!/bin/bash
# Stage 1 as a SLURM array: each array task tokenizes its contiguous share of the sorted
# SlimPajama file list into per-domain Megatron datasets (.bin/.idx + .stats.json).
#
#   sbatch --array=0-15 examples/prepare_data.sh       # or examples/submit_data_pipeline.sh,
#                                                      # which also submits the merge + blend
#
# tools/preprocess_data.py takes its shard from the array itself (--shard-index =
# SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, --num-shards = SLURM_ARRAY_TASK_COUNT), writes
# `$SHARD_PREFIX.shardIIIII-ofKKKKK_{domain}_text_document.*` and a `.done.json` marker last.
# A task that is rerun (requeue, node failure, resubmission of the whole array) skips a shard
# whose marker matches the same configuration, so the array is safe to resubmit as is.
# Every setting is an environment variable; sbatch exports the submitting shell's environment.
#
#SBATCH --job-name=longctx-prep
#SBATCH --array=0-15
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=06:00:00
#SBATCH --requeue
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

# sbatch runs a spool copy of this file: find the repository through the submit directory.
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-python}
DATA_DIR=${DATA_DIR:-/data/longctx}
# SlimPajama-627B layout: train/chunk1..chunk10/example_train_*.jsonl.zst. A directory is
# searched recursively and sorted, so every task sees the same list and takes its own slice.
INPUT=${INPUT:-/data/SlimPajama-627B/train}
SHARD_PREFIX=${SHARD_PREFIX:-$DATA_DIR/shards/slimpajama}
# The tokenizer of the model being extended (a HF directory; the .model for SentencePiece).
TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-/models/Llama-2-7b-hf}
# One dataset per SlimPajama source, so the planner can keep each domain's share.
DOMAIN_KEY=${DOMAIN_KEY:-meta.redpajama_set_name}
JSON_KEYS=${JSON_KEYS:-text}
# One tokenizer process per CPU of the task (the reader thread is cheap: blocks, not JSON).
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-$(nproc)}}
# skip: count bad records (with file:line samples in the stats); fail: stop at the first.
ON_ERROR=${ON_ERROR:-skip}
read -r -a EXTRA_ARGS <<< "${EXTRA_ARGS:-}"

read -r -a INPUT_ARGS <<< "$INPUT"     # several inputs: space-separated paths or globs
read -r -a KEY_ARGS <<< "$JSON_KEYS"
INPUT_FLAGS=(--input "${INPUT_ARGS[@]}" --json-keys "${KEY_ARGS[@]}" --domain-key "$DOMAIN_KEY")
TOKENIZER_FLAGS=(--tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL")
# EOD after each document: the packed 128K training samples cross document boundaries.
OUTPUT_FLAGS=(--output-prefix "$SHARD_PREFIX" --append-eod)
RUNTIME_FLAGS=(--workers "$WORKERS" --on-error "$ON_ERROR")

mkdir -p "$(dirname "$SHARD_PREFIX")"
echo "array task ${SLURM_ARRAY_TASK_ID:-none} of ${SLURM_ARRAY_TASK_COUNT:-1} on $(hostname)"
exec "$PYTHON" "$REPO_DIR/tools/preprocess_data.py" "${INPUT_FLAGS[@]}" "${TOKENIZER_FLAGS[@]}" \
  "${OUTPUT_FLAGS[@]}" "${RUNTIME_FLAGS[@]}" "${EXTRA_ARGS[@]}"
