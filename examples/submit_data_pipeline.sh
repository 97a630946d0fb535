#!/bin/bash
# Submit the data pipeline from a login node: the preprocessing array, then the merge + blend
# job that starts only if every array task succeeded (afterok on the array's job id).
#
#   INPUT=/data/SlimPajama-627B/train TOKENIZER_MODEL=/models/Llama-2-7b-hf \
#     DATA_DIR=/data/longctx examples/submit_data_pipeline.sh
#
# Prints "prepare JOBID" and "blend JOBID". All settings of prepare_data.sh and blend_data.sh
# are environment variables and reach the jobs through sbatch's default --export=ALL.
set -euo pipefail

REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export REPO_DIR  # the jobs find tools/ here whatever directory this is run from
# 16 tasks x 16 workers x ~4 MB/s of text per worker (HF LLaMA tokenizer) is ~1 GB/s: the
# whole 627B-token train split (~2.5 TB of text) in under an hour; one of its 10 chunk
# directories (~63B tokens) is already far more than the recipe's 5B tokens need.
ARRAY=${ARRAY:-0-15}
read -r -a SBATCH_ARGS <<< "${SBATCH_ARGS:-}"           # both jobs (e.g. --partition, --account)
read -r -a PREP_SBATCH_ARGS <<< "${PREP_SBATCH_ARGS:-}"
read -r -a BLEND_SBATCH_ARGS <<< "${BLEND_SBATCH_ARGS:-}"

PREP_ID=$(sbatch --parsable --array="$ARRAY" "${SBATCH_ARGS[@]}" "${PREP_SBATCH_ARGS[@]}" \
  "$REPO_DIR/examples/prepare_data.sh")
PREP_ID=${PREP_ID%%;*}  # --parsable prints "id[;cluster]"
# afterok on an array id waits for all of its tasks; if one fails, the blend job is cancelled
# (--kill-on-invalid-dep) instead of pending forever. Resubmitting the pipeline then redoes only
# the failed shards: completed ones are skipped by their markers.
BLEND_ID=$(sbatch --parsable --dependency="afterok:$PREP_ID" --kill-on-invalid-dep=yes \
  "${SBATCH_ARGS[@]}" "${BLEND_SBATCH_ARGS[@]}" "$REPO_DIR/examples/blend_data.sh")
BLEND_ID=${BLEND_ID%%;*}
echo "prepare $PREP_ID"
echo "blend $BLEND_ID"
