#!/bin/bash
# Stages 1b + 2 as one job, run after the whole prepare_data.sh array succeeded:
# merge the shards into one dataset per domain (byte-identical to an unsharded run), then
# plan the per-source length-upsampled mixture and write Megatron blend files and a report.
#
#   sbatch --dependency=afterok:$ARRAY_JOB_ID examples/blend_data.sh
#
# Outputs: $MERGED_PREFIX_{domain}_text_document.{bin,idx,stats.json} and in $MIX_DIR:
# mixture_plan.json (--mixture-plan for pretrain_longctx.py), blend.txt (--data-args-path),
# blend_per_split.json (--per-split-data-args-path), views/, report.md with plots.
#
#SBATCH --job-name=longctx-blend
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-python}
DATA_DIR=${DATA_DIR:-/data/longctx}
SHARD_PREFIX=${SHARD_PREFIX:-$DATA_DIR/shards/slimpajama}   # as in prepare_data.sh
MERGED_PREFIX=${MERGED_PREFIX:-$DATA_DIR/merged/slimpajama}
JSON_KEY=${JSON_KEY:-text}
MIX_DIR=${MIX_DIR:-$DATA_DIR/mix}
# The paper's recipe: keep SlimPajama's domain shares (the released code's token shares) and
# raise documents longer than 4K to 70% of each domain's tokens.
STRATEGY=${STRATEGY:-per-source}
DOMAIN_WEIGHTS=${DOMAIN_WEIGHTS:-slimpajama}
LONG_FRACTION=${LONG_FRACTION:-0.7}
LONG_THRESHOLD=${LONG_THRESHOLD:-4096}
# 5B training tokens at the training length; sample counts and repeat factors follow from it.
TRAIN_TOKENS=${TRAIN_TOKENS:-5e9}
SEQ_LENGTH=${SEQ_LENGTH:-131072}
# Hold out the last 0.1% of each dataset's documents for validation (blend_per_split.json).
VALID_FRACTION=${VALID_FRACTION:-0.001}
SEED=${SEED:-1234}
# 1: build the training index as the trainer does and fail (exit 3) if realized shares differ
# from the plan by more than 1%.
AUDIT=${AUDIT:-1}
read -r -a EXTRA_ARGS <<< "${EXTRA_ARGS:-}"

MERGE_FLAGS=(--input-prefix "$SHARD_PREFIX" --output-prefix "$MERGED_PREFIX")
PLAN_FLAGS=(
  --data-prefix "${MERGED_PREFIX}_*_${JSON_KEY}_document" --output-dir "$MIX_DIR"
  --strategy "$STRATEGY" --domain-weights "$DOMAIN_WEIGHTS"
  --long-fraction "$LONG_FRACTION" --long-threshold "$LONG_THRESHOLD"
  --train-tokens "$TRAIN_TOKENS" --seq-length "$SEQ_LENGTH"
  --valid-fraction "$VALID_FRACTION" --seed "$SEED"
)
if [[ $AUDIT == 1 ]]; then PLAN_FLAGS+=(--audit); fi

mkdir -p "$(dirname "$MERGED_PREFIX")" "$MIX_DIR"
# The merge refuses to run while any shard lacks its completion marker (names the missing ones).
"$PYTHON" "$REPO_DIR/tools/merge_datasets.py" "${MERGE_FLAGS[@]}"
"$PYTHON" "$REPO_DIR/tools/blend_mixture.py" "${PLAN_FLAGS[@]}" "${EXTRA_ARGS[@]}"
echo "mixture plan: $MIX_DIR/mixture_plan.json"
