#!/bin/bash
# Continual pretraining of LLaMA-2 7B to 128K context (Fu et al. 2024 recipe, scaled to 128K):
# converted HF checkpoint, RoPE base raised, LR 2e-5 constant, 4M tokens per step, FP8 on H100.
#
#   sbatch examples/train_128k.sh                       # 4 nodes x 8 H100 (default below)
#   sbatch --nodes=8 examples/train_128k.sh             # any node count dividing 32
#   SMOKE=1 sbatch --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 examples/train_128k.sh
#
# Every setting below is an environment variable with a default; SMOKE=1 swaps in a tiny CPU
# configuration but runs the same code path (rendezvous, signal forwarding, requeue, resume).
# Preemption: Slurm sends USR1 to this shell 300 s before the time limit (--signal=B:USR1@300);
# we forward it to the srun'd trainer, which saves a checkpoint and exits 75; on 75 we requeue
# the job, and the next attempt resumes from the newest checkpoint in $SAVE_DIR. A USR1/TERM
# at any other moment ends in a requeue too, never a failed job: before srun starts it is
# recorded and the job requeued without starting the trainer; while ranks start, the trainer
# records it from its first line and exits 75 without saving (nothing trained yet).
# Multi-node: SOCKET_IFNAME picks the network interface of gloo and NCCL (docs/slurm.md).
# Another model: MODEL_FLAGS replaces the LLaMA-2 7B architecture flags, e.g. LLaMA-3 8B
#   MODEL_FLAGS="--model-preset llama3-8b" ROTARY_BASE=<raised base, docs/rope.md> \
#   HF_MODEL_DIR=... BASE_CHECKPOINT=... sbatch examples/train_128k.sh
# or LLaMA-3.1 8B, which keeps its released llama3 scaling (docs/rope.md)
#   MODEL_FLAGS="--model-preset llama3.1-8b" ROTARY_BASE=500000 ...
# (Qwen2.5: its shape flags plus --group-query-attention --num-query-groups N --add-qkv-bias).
# See docs/slurm.md for the memory arithmetic behind the layout and for the data pipeline.
#
#SBATCH --job-name=longctx-128k
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# First command (sbatch reads #SBATCH lines only above it): from here on USR1/TERM are recorded,
# not fatal; the launch below acts on a recorded signal (phases: docs/slurm.md).
PENDING_SIGNAL=
trap 'PENDING_SIGNAL=USR1' USR1
trap 'PENDING_SIGNAL=TERM' TERM
set -euo pipefail

SMOKE=${SMOKE:-0}
# sbatch runs a copy of this file from the spool directory, so the repository is found through
# the submit directory (submit from the repository root) or REPO_DIR.
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-python}
# CONTAINER_IMAGE (an enroot .sqsh or image of our Dockerfile) runs every task in the container
# through pyxis' srun flags; the trainer is then the image's copy of the repository.
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
if [[ -n $CONTAINER_IMAGE ]]; then
  TRAINER=${TRAINER:-/workspace/megatron-longctx/pretrain_longctx.py}
else
  TRAINER=${TRAINER:-$REPO_DIR/pretrain_longctx.py}
fi
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "error: submit with sbatch (this script uses the job's allocation)" >&2
  exit 2
fi

# ---------------------------------------------------------------------------------------------
# Settings. ${VAR:=default} keeps a value from the environment; the smoke defaults shrink the
# run to seconds on two CPU processes.
if [[ $SMOKE == 1 ]]; then
  : "${RUN_NAME:=smoke}"
  : "${SEQ_LENGTH:=256}"
  : "${ROTARY_BASE:=10000}"
  : "${MICRO_BATCH_SIZE:=1}"
  : "${GLOBAL_BATCH_SIZE:=4}"
  : "${TRAIN_ITERS:=20}"
  : "${SAVE_INTERVAL:=10}"
  : "${EVAL_INTERVAL:=10}"
  : "${EVAL_ITERS:=2}"
  : "${TP:=1}"
  : "${CP:=1}"
  : "${PP:=1}"
  : "${RECOMPUTE_NUM_LAYERS:=0}"
  : "${PRECISION:=fp32}"               # this CPU has no bf16 units; fp32 is 4-7x faster
  : "${TRANSFORMER_IMPL:=local}"       # Transformer Engine needs CUDA
  # cpu: hide the (possibly fake) GPUs from the tasks so the trainer takes its gloo/CPU path
  # even on a GPU node; gpu: keep them.
  : "${SMOKE_DEVICE:=cpu}"
else
  : "${RUN_NAME:=llama2-7b-128k}"
  : "${SEQ_LENGTH:=131072}"
  # RoPE base. Fu et al. only "adjust the base"; their released 7B uses HF dynamic NTK (factor
  # 10), an effective base of ~2.1M at 80K. The same rule at 128K gives ~3.4M; we round up to
  # 5M (lowest-frequency wavelength ~25M positions, far beyond 128K). The authors' advice: any
  # base covering > 128K works, continued training adapts the model to it (docs/slurm.md).
  : "${ROTARY_BASE:=5000000}"
  # 4M tokens per step as in the paper: 32 sequences x 131072 = 4,194,304 tokens.
  : "${MICRO_BATCH_SIZE:=1}"
  : "${GLOBAL_BATCH_SIZE:=32}"
  : "${TRAIN_TOKENS:=5000000000}"      # the paper's 5B tokens
  : "${TRAIN_ITERS:=$(( (TRAIN_TOKENS + GLOBAL_BATCH_SIZE * SEQ_LENGTH - 1) / (GLOBAL_BATCH_SIZE * SEQ_LENGTH) ))}"
  : "${SAVE_INTERVAL:=50}"             # ~50 min of work at ~58 s/step (docs/slurm.md)
  : "${EVAL_INTERVAL:=100}"
  : "${EVAL_ITERS:=4}"
  # Layout per node: TP2 x CP4 = 8 GPUs = one model replica; data parallel across nodes.
  # Memory per H100 (80 GB), 4 nodes (DP4; the distributed optimizer shards over DP x CP = 16):
  #   weights bf16 2 B x 6.74B/TP2 = 6.7 GB; fp32 main grads 4 B x 3.37B = 13.5 GB;
  #   Adam (fp32 master, m, v) 12 B x 3.37B / 16 = 2.5 GB (10.1 GB on 1 node);
  #   TE FP8 weight copies (+ transposes) ~3.4-6.7 GB            -> static ~28 GB.
  #   Activations: 131072 / CP4 = 32768 tokens per GPU; a LLaMA layer keeps ~32 x s x h bytes in
  #   bf16 with flash attention (Korthikanti et al.'s 34sbh without dropout), / TP2 with sequence
  #   parallel: 32 x 32768 x 4096 / 2 = 2.15 GB per layer, 69 GB for 32 layers: too much.
  #   Full recompute of a layer keeps only its input, 2 x 32768 x 4096 / 2 = 134 MB.
  #   Recomputing 20 of 32 layers (block): 12 x 2.15 + 20 x 0.13 + 2.15 (the layer being
  #   recomputed) = 30.6 GB. Loss: megatron's stock path (CROSS_ENTROPY_IMPL=megatron) keeps
  #   logits 32768 x 32000/TP2 x (2 B bf16 + 4 B fp32 softmax) = 3.1 GB; the chunked loss
  #   (default) keeps a 1024-token chunk (1024 x 16000 x 6 B = 0.1 GB), an fp32
  #   weight gradient 16000 x 4096 x 4 B = 0.26 GB and grad_hidden 32768 x 4096 x 2 B =
  #   0.27 GB: ~0.6 GB, 2.5 GB less. CP ring K/V buffers ~1 GB; NCCL/cuBLAS workspaces and
  #   fragmentation ~6 GB -> total ~66.5 GB at 4 nodes, ~73.5 GB on 1 node. FP8 keeps GEMM
  #   inputs in 1 byte (~-20% of activations): margin. Each recomputed layer kept instead costs
  #   2.15 - 0.13 = 2.0 GB: the chunked loss pays for one (19 layers, ~1% of step time);
  #   16 layers (~74.5 GB total at >= 4 nodes) saves ~4% of step time once measured to fit;
  #   32 always fits (~6.6 GB) at ~+33% compute instead of ~+21% for 20. LLaMA-3 8B
  #   (128,256 rows): stock logits 32768 x 64128 x 6 B = 12.6 GB vs ~1.7 GB chunked, 10.9 GB
  #   freed = 4-5 recomputed layers fewer (docs/slurm.md).
  # Why TP2 x CP4 rather than TP1 x CP8: TP2 halves weights and grads (-20 GB per GPU) for a
  # small GEMM-efficiency cost; both keep TP and CP on NVLink inside a node. CP p2p (ring)
  # overlaps the K/V exchange with attention compute; a2a is the alternative (heads/TP = 16 is
  # divisible by CP = 4).
  : "${TP:=2}"
  : "${CP:=4}"
  : "${PP:=1}"
  : "${RECOMPUTE_NUM_LAYERS:=20}"
  : "${PRECISION:=fp8}"                # fp8 (hybrid E4M3/E5M2, delayed scaling) | bf16
  : "${TRANSFORMER_IMPL:=transformer_engine}"
  : "${SMOKE_DEVICE:=gpu}"
fi
# Output-layer loss: chunked (fused with the output GEMM, never [tokens, vocab] logits, padded
# vocabulary rows excluded) | megatron (stock, for comparison). Chunk: tokens per chunk; its
# fp32 logits are chunk x vocab/TP x 4 B (1024 x 16000 x 4 B = 66 MB for LLaMA-2 at TP2).
: "${CROSS_ENTROPY_IMPL:=chunked}"
: "${CROSS_ENTROPY_CHUNK_SIZE:=1024}"
: "${LR:=2e-5}"                        # the paper: constant 2e-5
: "${LR_WARMUP_ITERS:=0}"
: "${WEIGHT_DECAY:=0.1}"
: "${CLIP_GRAD:=1.0}"
: "${SEED:=1234}"
: "${LOG_INTERVAL:=1}"
: "${CP_COMM_TYPE:=p2p}"
: "${MAX_RESTARTS:=20}"                # requeue at most this many times (a crash loop stops)
: "${SRUN_WAIT:=120}"                  # s to let other ranks exit after the first one did
: "${EXIT_MARGIN_MINS:=10}"            # --exit-duration-in-mins = time left at start - this
: "${DATA_DIR:=/data/longctx}"
: "${MIXTURE_PLAN:=$DATA_DIR/mix/mixture_plan.json}"   # written by examples/blend_data.sh
: "${DATA_ARGS_PATH:=}"                # alternatively a Megatron blend file (mix/blend.txt)
: "${PER_SPLIT_DATA_ARGS_PATH:=}"      # or mix/blend_per_split.json
: "${HF_MODEL_DIR:=/models/Llama-2-7b-hf}"             # tokenizer files
# Converted HF weights, loaded by the first attempt only: `tools/convert_checkpoint.py
# hf-to-megatron --hf-dir $HF_MODEL_DIR --save $BASE_CHECKPOINT`. The checkpoint is model-only,
# so the trainer starts at iteration 0 with a fresh optimizer (no --finetune needed).
: "${BASE_CHECKPOINT:=/models/llama2-7b-megatron}"
: "${RUNS_DIR:=$REPO_DIR/runs}"
: "${RUN_DIR:=$RUNS_DIR/$RUN_NAME}"
: "${SAVE_DIR:=$RUN_DIR/checkpoints}"
read -r -a EXTRA_ARGS <<< "${EXTRA_ARGS:-}"  # appended verbatim to the trainer's flags
# Architecture flags instead of the defaults below (LLaMA-2 7B; smoke: the tiny preset).
read -r -a MODEL_FLAGS_ARRAY <<< "${MODEL_FLAGS:-}"

# ---------------------------------------------------------------------------------------------
# Early checks with the formula (fail here, not after minutes of NCCL set-up).
WORLD_SIZE=${SLURM_NTASKS:?}
MODEL_PARALLEL=$(( TP * CP * PP ))
if (( WORLD_SIZE % MODEL_PARALLEL )); then
  echo "error: $WORLD_SIZE tasks are not a multiple of TP*CP*PP = $TP*$CP*$PP" >&2; exit 2
fi
DP=$(( WORLD_SIZE / MODEL_PARALLEL ))
if (( GLOBAL_BATCH_SIZE % (MICRO_BATCH_SIZE * DP) )); then
  echo "error: GLOBAL_BATCH_SIZE $GLOBAL_BATCH_SIZE % (MICRO_BATCH_SIZE $MICRO_BATCH_SIZE" \
       "x DP $DP) != 0; choose a node count dividing it" >&2; exit 2
fi
if (( SEQ_LENGTH % (TP * 2 * CP) )); then
  echo "error: SEQ_LENGTH $SEQ_LENGTH % (TP*2*CP = $(( TP * 2 * CP ))) != 0" >&2; exit 2
fi
case $PRECISION in
  fp8 | bf16 | fp32) ;;
  *) echo "error: PRECISION must be fp8, bf16 or fp32, not '$PRECISION'" >&2; exit 2 ;;
esac

ATTEMPT=${SLURM_RESTART_COUNT:-0}
LOG_DIR=$RUN_DIR/logs
mkdir -p "$LOG_DIR" "$SAVE_DIR" "$RUN_DIR/tensorboard"
TRAIN_LOG=$LOG_DIR/train-$SLURM_JOB_ID-attempt$ATTEMPT.log

# Resume: the newest complete checkpoint in SAVE_DIR (the trainer writes
# latest_checkpointed_iteration.txt only after a save completed) wins over the base weights.
LOAD_ARGS=()
if [[ -f $SAVE_DIR/latest_checkpointed_iteration.txt ]]; then
  LOAD_ARGS=(--load "$SAVE_DIR")
elif [[ $SMOKE != 1 ]]; then
  LOAD_ARGS=(--load "$BASE_CHECKPOINT")
fi

# The trainer stops by itself shortly before the time limit too (a second line of defence if
# USR1 is lost): the job's time left at start (squeue %L: [D-]HH:MM:SS, MM:SS, UNLIMITED).
EXIT_ARGS=()
TIME_LEFT=$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null || true)
if [[ $TIME_LEFT =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]]; then
  MINS_LEFT=$(( 10#${BASH_REMATCH[2]:-0} * 1440 + 10#${BASH_REMATCH[4]:-0} * 60 + 10#${BASH_REMATCH[5]} ))
  if (( MINS_LEFT > EXIT_MARGIN_MINS )); then
    EXIT_ARGS=(--exit-duration-in-mins $(( MINS_LEFT - EXIT_MARGIN_MINS )))
  fi
fi

# ---------------------------------------------------------------------------------------------
# Distributed environment. One srun task per GPU: every rank is a direct child of slurmstepd,
# so Slurm signals (USR1, TERM on preemption) and kills reach each rank without an agent in
# between, ranks come from SLURM_PROCID/SLURM_LOCALID (no rendezvous service) and srun labels
# and accounts every rank. torchrun would add one elastic agent per node that has to be
# launched by srun anyway, forward signals itself and run its own c10d rendezvous.
# The rendezvous is always derived from this job (a MASTER_ADDR exported from the submitting
# shell would be stale); RDZV_ADDR / RDZV_PORT override it. The port differs per job on a node.
MASTER_ADDR=${RDZV_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${RDZV_PORT:-$(( 20000 + SLURM_JOB_ID % 10000 ))}
export MASTER_ADDR MASTER_PORT
# TE/Megatron: one hardware queue so TP/CP communication kernels are ordered before compute.
export CUDA_DEVICE_MAX_CONNECTIONS=1
# NCCL: abort on a failed or timed-out collective instead of hanging until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}   # longer IB retry timeout for large jobs
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# FP8 attention: TE's fused (cuDNN) backend runs it on sm90; 1 = FP8 backward too (TE's
# default). Set 0 to keep the attention backward in BF16 if loss or needle accuracy suffers.
export NVTE_FP8_DPA_BWD=${NVTE_FP8_DPA_BWD:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Network interface of gloo (the CPU groups, and the whole smoke run) and NCCL (its bootstrap
# and socket transport). Both bind to the address the host name resolves to unless told
# otherwise; where that is a loopback address (Debian's default /etc/hosts maps the host name
# to 127.0.1.1) ranks on other nodes cannot reach it and the rendezvous fails.
# SOCKET_IFNAME=eth0 sets both GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (either may also be
# set on its own, and wins); unset, a multi-node job whose host name resolves to loopback uses
# the interface of the default route and says so.
: "${SOCKET_IFNAME:=}"
if [[ -z $SOCKET_IFNAME && -z ${GLOO_SOCKET_IFNAME:-} && ${SLURM_JOB_NUM_NODES:-1} -gt 1 ]]; then
  HOST_ADDR=$(getent hosts "$(hostname)" 2>/dev/null | awk '{print $1; exit}' || true)
  if [[ $HOST_ADDR == 127.* || $HOST_ADDR == ::1 ]]; then
    SOCKET_IFNAME=$(ip -o route show default 2>/dev/null \
                    | awk '{for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}' \
                    || true)
    echo "warning: $(hostname) resolves to loopback $HOST_ADDR; gloo/NCCL use interface" \
         "'${SOCKET_IFNAME:-(none found)}' (set SOCKET_IFNAME to choose)" >&2
  fi
fi
if [[ -n $SOCKET_IFNAME ]]; then
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME}
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}
fi
TASK_ENV=()
if [[ $SMOKE == 1 && $SMOKE_DEVICE == cpu ]]; then
  TASK_ENV=(env CUDA_VISIBLE_DEVICES=)  # slurmd sets it per step; override inside the task
fi

# ---------------------------------------------------------------------------------------------
# Trainer flags (Megatron-LM names), grouped.
if (( ${#MODEL_FLAGS_ARRAY[@]} )); then
  MODEL_ARGS=("${MODEL_FLAGS_ARRAY[@]}")
elif [[ $SMOKE == 1 ]]; then
  MODEL_ARGS=(--model-preset tiny)
else
  # LLaMA-2 7B (config.json of the HF release); equivalent to --model-preset llama2-7b.
  MODEL_ARGS=(
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32
    --normalization RMSNorm --swiglu --untie-embeddings-and-output-weights
    --disable-bias-linear --position-embedding-type rope
  )
fi
CONTEXT_ARGS=(
  --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH" --rotary-base "$ROTARY_BASE"
)
if [[ $SMOKE == 1 ]]; then
  DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 512)
else
  if [[ -n $DATA_ARGS_PATH ]]; then
    DATA_ARGS=(--data-args-path "$DATA_ARGS_PATH")
  elif [[ -n $PER_SPLIT_DATA_ARGS_PATH ]]; then
    DATA_ARGS=(--per-split-data-args-path "$PER_SPLIT_DATA_ARGS_PATH")
  else
    DATA_ARGS=(--mixture-plan "$MIXTURE_PLAN")  # per-source upsampling, validation held out
  fi
  DATA_ARGS+=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$HF_MODEL_DIR")
fi
TRAINING_ARGS=(
  --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
  --train-iters "$TRAIN_ITERS"
  --lr "$LR" --min-lr "$LR" --lr-warmup-iters "$LR_WARMUP_ITERS" --lr-decay-style constant
  --weight-decay "$WEIGHT_DECAY" --clip-grad "$CLIP_GRAD" --seed "$SEED"
)
PARALLEL_ARGS=(
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --context-parallel-size "$CP" --use-distributed-optimizer
)
if (( TP > 1 )); then PARALLEL_ARGS+=(--sequence-parallel); fi
if (( CP > 1 )); then PARALLEL_ARGS+=(--cp-comm-type "$CP_COMM_TYPE"); fi
if (( RECOMPUTE_NUM_LAYERS > 0 )); then
  # block: the first N layers of each stage recompute everything, the rest keep activations.
  PARALLEL_ARGS+=(--recompute-granularity full --recompute-method block
                  --recompute-num-layers "$RECOMPUTE_NUM_LAYERS")
fi
PRECISION_ARGS=(--transformer-impl "$TRANSFORMER_IMPL" --cross-entropy-impl "$CROSS_ENTROPY_IMPL"
                --cross-entropy-chunk-size "$CROSS_ENTROPY_CHUNK_SIZE")
case $PRECISION in
  fp8)
    # hybrid: E4M3 forward, E5M2 gradients; delayed scaling from a 1024-step amax history
    # (Megatron-LM's LLaMA FP8 example). FP8 attention: TE's fused attention (cuDNN).
    PRECISION_ARGS+=(--bf16 --fp8-format hybrid --fp8-recipe delayed
                     --fp8-amax-history-len 1024 --fp8-amax-compute-algo max
                     --fp8-dot-product-attention --attention-backend fused) ;;
  bf16) PRECISION_ARGS+=(--bf16) ;;
  fp32) ;;
esac
CHECKPOINT_ARGS=(
  --save "$SAVE_DIR" --save-interval "$SAVE_INTERVAL" --exit-signal-handler
  "${LOAD_ARGS[@]}" "${EXIT_ARGS[@]}"
)
LOGGING_ARGS=(
  --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
  --tensorboard-dir "$RUN_DIR/tensorboard"
)
# GPU runs: periodic saves written in the background (--async-save), the newest
# KEEP_LAST_CHECKPOINTS complete checkpoints kept plus every KEEP_CHECKPOINTS_EVERY-th iteration,
# and W&B (project WANDB_PROJECT, run RUN_NAME, under RUN_DIR/wandb). Without WANDB_API_KEY the
# run is written offline (WANDB_MODE=offline; upload later with `wandb sync RUN_DIR/wandb/...`).
if [[ ! ( $SMOKE == 1 && $SMOKE_DEVICE == cpu ) ]]; then
  CHECKPOINT_ARGS+=(--async-save --keep-last-checkpoints "${KEEP_LAST_CHECKPOINTS:-2}"
    --keep-checkpoints-every "${KEEP_CHECKPOINTS_EVERY:-1000}")
  LOGGING_ARGS+=(--wandb-project "${WANDB_PROJECT:-megatron-longctx}" --wandb-exp-name "$RUN_NAME"
    --wandb-save-dir "$RUN_DIR" --log-throughput --log-memory-to-tensorboard
    --log-timers-to-tensorboard)
  if [[ -z ${WANDB_API_KEY:-} ]]; then
    if (( ${#TASK_ENV[@]} == 0 )); then TASK_ENV=(env); fi
    TASK_ENV+=(WANDB_MODE="${WANDB_MODE:-offline}")
  fi
fi

# srun: one task per GPU with the job's CPUs per task (since Slurm 22.05 srun does not inherit
# --cpus-per-task from sbatch). No --kill-on-bad-exit: a rank killed while the others exit 75
# would turn srun's status into 137 and lose the requeue; --wait kills the rest SRUN_WAIT s
# after the first rank exits instead (a crashed rank cannot hang the job). Every task sees all
# GPUs of its node and picks SLURM_LOCALID (per-task GPU binding hides peers from NCCL P2P).
SRUN_ARGS=(--kill-on-bad-exit=0 --wait="$SRUN_WAIT" --label)
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
if [[ -n $CONTAINER_IMAGE ]]; then
  # Same paths inside as outside, so every path in the command means the same file.
  : "${CONTAINER_MOUNTS:=$DATA_DIR:$DATA_DIR,$RUN_DIR:$RUN_DIR,$HF_MODEL_DIR:$HF_MODEL_DIR,$BASE_CHECKPOINT:$BASE_CHECKPOINT}"
  SRUN_ARGS+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$CONTAINER_MOUNTS")
fi
CMD=(
  "${TASK_ENV[@]}" "$PYTHON" "$TRAINER"
  "${MODEL_ARGS[@]}" "${CONTEXT_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}"
  "${PARALLEL_ARGS[@]}" "${PRECISION_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}"
  "${EXTRA_ARGS[@]}"
)

# ---------------------------------------------------------------------------------------------
# Memory check before srun: the planner's estimate for exactly these flags
# (`pretrain_longctx.py --dry-run`: no process group, seconds). A layout estimated over
# GPU_MEMORY_GB per GPU stops the job here (exit 2) with the estimate by term and layouts that
# fit, instead of an out-of-memory crash after start-up. PLAN_CHECK=0 skips it (e.g. a layout
# measured to fit). An estimate that cannot run (e.g. no Python environment on the batch host)
# only warns. Skipped with CONTAINER_IMAGE (the batch host may lack the image's packages).
: "${PLAN_CHECK:=1}"
: "${GPU_MEMORY_GB:=80}"
if [[ $PLAN_CHECK == 1 && -z $CONTAINER_IMAGE ]]; then
  PLAN_RC=0
  "$PYTHON" "$REPO_DIR/pretrain_longctx.py" "${MODEL_ARGS[@]}" "${CONTEXT_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${PRECISION_ARGS[@]}" \
    "${EXTRA_ARGS[@]}" --dry-run --plan-world-size "$WORLD_SIZE" \
    --gpu-memory-gb "$GPU_MEMORY_GB" || PLAN_RC=$?
  if (( PLAN_RC == 4 )); then
    echo "error: TP$TP CP$CP PP$PP with RECOMPUTE_NUM_LAYERS=$RECOMPUTE_NUM_LAYERS is estimated" \
         "over $GPU_MEMORY_GB GB per GPU (estimate above); use a suggested layout or" \
         "PLAN_CHECK=0 to run anyway" >&2
    exit 2
  elif (( PLAN_RC != 0 )); then
    echo "warning: memory estimate failed (exit $PLAN_RC); starting without it" >&2
  fi
fi

# The resolved command of this attempt, re-runnable by hand inside an allocation.
{
  echo "# job $SLURM_JOB_ID attempt $ATTEMPT on $SLURM_JOB_NODELIST ($WORLD_SIZE tasks," \
       "TP$TP CP$CP PP$PP DP$DP), $(date -Is)"
  for var in MASTER_ADDR MASTER_PORT CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING \
             NCCL_DEBUG NCCL_IB_TIMEOUT TORCH_NCCL_AVOID_RECORD_STREAMS NVTE_FP8_DPA_BWD \
             OMP_NUM_THREADS GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do
    if [[ -n ${!var+set} ]]; then printf 'export %s=%q\n' "$var" "${!var}"; fi
  done
  printf '%q ' srun "${SRUN_ARGS[@]}" "${CMD[@]}"
  echo
} > "$LOG_DIR/command-$SLURM_JOB_ID-attempt$ATTEMPT.sh"
cp "$LOG_DIR/command-$SLURM_JOB_ID-attempt$ATTEMPT.sh" "$RUN_DIR/command.sh"
echo "run dir $RUN_DIR; attempt $ATTEMPT; log $TRAIN_LOG"

# ---------------------------------------------------------------------------------------------
# Requeue: the next attempt resumes from the newest complete checkpoint in SAVE_DIR.
requeue() {
  if (( ATTEMPT >= MAX_RESTARTS )); then
    echo "not requeueing: $ATTEMPT restarts already (MAX_RESTARTS=$MAX_RESTARTS)" >&2
    exit 75
  fi
  echo "requeueing job $SLURM_JOB_ID (attempt $(( ATTEMPT + 1 )) resumes from $SAVE_DIR)"
  scontrol requeue "$SLURM_JOB_ID"  # ends this attempt; the job returns to the queue
  exit 0
}

# A signal recorded during the set-up above: nothing was started, so nothing to save.
if [[ -n $PENDING_SIGNAL ]]; then
  echo "$(date -Is) got SIG$PENDING_SIGNAL before the trainer started"
  requeue
fi

# ---------------------------------------------------------------------------------------------
# Launch in the background so this shell can take signals while the trainer runs (bash runs a
# trap only between foreground commands); output goes to the job log and the attempt's log.
srun "${SRUN_ARGS[@]}" "${CMD[@]}" > >(tee -a "$TRAIN_LOG") 2>&1 &
SRUN_PID=$!
SRUN_START=$SECONDS
: "${SIGNAL_RESEND_SECS:=10}"  # srun drops a signal that arrives before its tasks exist
# shellcheck disable=SC2317  # called from the traps below
forward() {
  echo "$(date -Is) got SIG$1: forwarding to the trainer (srun pid $SRUN_PID)"
  FORWARDED=$1
  kill -s "$1" "$SRUN_PID" 2>/dev/null || true  # srun passes USR1/TERM on to every task
  local age=$(( SECONDS - SRUN_START ))
  if (( age < SIGNAL_RESEND_SECS )); then
    # srun may still be creating the step and then loses the signal; send it once more when
    # the ranks surely run (they record it from their first line; a second copy is harmless).
    { sleep $(( SIGNAL_RESEND_SECS - age )); kill -s "$1" "$SRUN_PID" 2>/dev/null || true; } &
    RESEND_PID=$!
  fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# A signal between the check above and these traps was only recorded: forward it now.
if [[ -n $PENDING_SIGNAL ]]; then forward "$PENDING_SIGNAL"; fi
while :; do
  RC=0
  wait "$SRUN_PID" || RC=$?
  # wait returns >128 when a trapped signal interrupted it; keep waiting while srun runs.
  if (( RC > 128 )) && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
  break
done
# After the trainer: a signal is recorded, never fatal; the trainer's exit code decides.
trap 'PENDING_SIGNAL=USR1' USR1
trap 'PENDING_SIGNAL=TERM' TERM
if [[ -n ${RESEND_PID:-} ]]; then kill "$RESEND_PID" 2>/dev/null || true; fi
echo "$(date -Is) trainer exited with $RC"

if (( RC == 75 )); then
  # Checkpoint saved on a signal or at --exit-duration-in-mins (or a signal before the first
  # step: nothing to save): run again from the newest checkpoint.
  requeue
fi
if [[ -n ${FORWARDED:-} ]] && (( RC == 138 || RC == 143 )); then
  # The forwarded USR1/TERM (138/143) ended srun before it could pass it on (the moment
  # between its fork and its own handlers) or a rank before its handler existed: nothing was
  # saved by this attempt, the newest checkpoint stands.
  echo "srun ended by the forwarded SIG$FORWARDED before the trainer could save"
  requeue
fi
exit "$RC"
