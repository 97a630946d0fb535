"""The pretrain entrypoint's configuration: Megatron-LM flags -> typed, validated dataclasses.

`parse_pretrain_args(argv)` is the only place that knows the command line. Each flag is declared
once, on the field it sets (`option(default, Flag(...))`, config/flags.py), with Megatron-LM's
names (so an existing launch script's flags carry over); the parser and the namespace -> config
translation are generated from the fields. Architecture defaults come from a named preset
(`--model-preset`); the Megatron-LM switches that are not fields are declared in
`MEGATRON_COMPAT_FLAGS`. The returned `PretrainConfig`'s `validate()` checks every constraint
before any process group or tensor exists; each message names the flag to change.

Two settings are left to the run and resolved into a *new* config by `resolve_runtime` (the
entrypoint does it before validating; nothing mutates a validated config): the transformer
implementation (None = TE when importable) and the model's vocabulary (the tokenizer's, padded
to --make-vocab-size-divisible-by x TP, or --padded-vocab-size).

Flags accepted for compatibility whose value is fixed in this fork (LLaMA only) are checked, not
ignored: `--normalization` must be RMSNorm, `--position-embedding-type` rope; `--swiglu` and
`--disable-bias-linear` describe what the model always is.

RoPE and long context: `--rotary-base B` raises the base before continual pretraining at a
longer length (Fu et al.: LLaMA-2's 1e4 -> an effective ~2.1M at 80K; the recipe's default, needs
0.5-5B tokens to adapt). `--rope-type {default,linear,dynamic,yarn,llama3,longrope}` with its
parameters selects HF transformers' scaling schemes, each exact against HF (model/rotary.py);
docs/rope.md says which to use when and how each maps to HF's `rope_scaling`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Any

from megatron_longctx.config.flags import (
    Flag,
    add_config_flags,
    config_from_namespace,
    given,
    option,
)
from megatron_longctx.config.model import ModelConfig, ParallelConfig, PrecisionConfig, validate_all
from megatron_longctx.config.plan import PlanConfig
from megatron_longctx.config.presets import PRESET_NAMES
from megatron_longctx.config.tokenizer import NULL_TOKENIZER, TOKENIZER_TYPES

LR_DECAY_STYLES = ("constant", "cosine", "linear")
NAN_POLICIES = ("stop", "skip")
#: megatron-core 0.16.1's offload_modules for dense models (MoE ones are not used here).
OFFLOAD_MODULES = ("attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm")

#: Exit code after a save on SIGTERM/SIGUSR1 or --exit-duration-in-mins: "requeue me".
#: 75 is EX_TEMPFAIL (sysexits.h): the job is not done and a rerun will continue it.
EXIT_REQUEUE = 75
#: Exit code when a non-finite loss stops training (--on-nan-loss stop).
EXIT_NAN = 3


@dataclass
class DataConfig:
    """Where batches come from (exactly one source) and how they are shaped.

    Attributes:
        mixture_plan: our planner's mixture_plan.json (`--mixture-plan`): per-source length
            upsampling realized in the dataset, per-domain loss by plan domain.
        data_path: Megatron blend `w1 p1 w2 p2 ...` or a single prefix (`--data-path`).
        data_args_path: file holding the same list (`--data-args-path`).
        per_split_data_args_path: JSON with train/valid/test blends (`--per-split-data-args-path`).
        mock_data: random tokens (`--mock-data`), for smoke runs and benchmarks.
        split: train/valid/test proportions (`--split`), for --data-path blends.
        tokenizer_type / tokenizer_model / vocab_size: only eod and vocab matter for training;
            NullTokenizer takes `--vocab-size` (eod = vocab_size - 1, as megatron's NullTokenizer).
        reset_attention_mask: intra-document attention (`--reset-attention-mask`); documents in a
            packed sample do not attend to each other. Fu et al. do not mask (off by default).
        reset_position_ids: RoPE positions restart at 0 in every document
            (`--reset-position-ids`, needs --reset-attention-mask); off by default, as in Fu et
            al. and ProLong, which keep each token's position in the packed row.
        document_pad_multiple: with --reset-attention-mask, pad every document to a
            multiple of this (`--document-pad-multiple`; default 2 x CP, what Transformer
            Engine's THD split needs). A multiple of 2 x CP; the same value at every CP size
            gives identical batches, e.g. to compare or change CP sizes within a run.
        eod_mask_loss: no loss on EOD tokens (`--eod-mask-loss`).
        data_cache_path: where megatron caches sample indices (`--data-cache-path`).
    """

    mixture_plan: str | None = option(None, Flag(
        "--mixture-plan", "mixture_plan.json from blend_mixture.py"))
    data_path: list[str] | None = option(None, Flag(
        "--data-path", "Megatron blend: w1 p1 w2 p2 ... or one prefix"))
    data_args_path: str | None = option(None, Flag(
        "--data-args-path", "file holding the --data-path list"))
    per_split_data_args_path: str | None = option(None, Flag(
        "--per-split-data-args-path", "JSON with train/valid/test blends"))
    mock_data: bool = option(False, Flag("--mock-data", "random tokens (smoke runs)"))
    split: str = option("969,30,1", Flag(
        "--split", "train/valid/test proportions for --data-path blends"))
    tokenizer_type: str = option("HuggingFaceTokenizer", Flag(
        "--tokenizer-type", f"{' | '.join(TOKENIZER_TYPES)}"))
    tokenizer_model: str | None = option(None, Flag(
        "--tokenizer-model", "tokenizer directory / file (optional with --mixture-plan, which "
        "records it)"))
    vocab_size: int | None = option(None, Flag(
        "--vocab-size", "NullTokenizer's vocabulary (eod = vocab - 1)"))
    reset_attention_mask: bool = option(False, Flag(
        "--reset-attention-mask", "intra-document attention in packed samples"))
    reset_position_ids: bool = option(False, Flag(
        "--reset-position-ids", "RoPE positions restart per document (with "
        "--reset-attention-mask)"))
    document_pad_multiple: int | None = option(None, Flag(
        "--document-pad-multiple", "with --reset-attention-mask: pad each document to a "
        "multiple of this (default 2 x CP)"))
    eod_mask_loss: bool = option(False, Flag("--eod-mask-loss", "no loss on EOD tokens"))
    data_cache_path: str | None = option(None, Flag(
        "--data-cache-path", "where sample indices are cached"))

    def sources(self) -> list[str]:
        """Flags naming a data source that are set."""
        chosen = []
        for flag, value in (("--mixture-plan", self.mixture_plan),
                            ("--data-path", self.data_path),
                            ("--data-args-path", self.data_args_path),
                            ("--per-split-data-args-path", self.per_split_data_args_path),
                            ("--mock-data", self.mock_data)):
            if value:
                chosen.append(flag)
        return chosen

    def validate(self) -> None:
        chosen = self.sources()
        if len(chosen) != 1:
            raise ValueError(
                "exactly one data source is needed: --mixture-plan, --data-path, "
                "--data-args-path, --per-split-data-args-path or --mock-data"
                + (f" (given: {' '.join(chosen)})" if chosen else " (none given)")
            )
        for flag, path in (("--mixture-plan", self.mixture_plan),
                           ("--data-args-path", self.data_args_path),
                           ("--per-split-data-args-path", self.per_split_data_args_path)):
            if path and not os.path.isfile(path):
                raise ValueError(f"{flag} {path}: no such file")
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(f"--tokenizer-type must be one of {TOKENIZER_TYPES}, got "
                             f"{self.tokenizer_type!r}")
        if self.tokenizer_type == NULL_TOKENIZER:
            if not self.vocab_size or self.vocab_size < 2:
                raise ValueError(f"--tokenizer-type {NULL_TOKENIZER} needs --vocab-size >= 2")
        elif not self.tokenizer_model and not self.mixture_plan:
            raise ValueError(f"--tokenizer-type {self.tokenizer_type} needs --tokenizer-model "
                             "(optional with --mixture-plan, which records the tokenizer)")
        if not self.mock_data and not self.mixture_plan:
            parts = self.split.replace("/", ",").split(",")
            try:
                values = [float(p) for p in parts]
            except ValueError:
                raise ValueError(f"--split must be numbers like 969,30,1, got {self.split!r}"
                                 ) from None
            if len(values) > 3 or any(v < 0 for v in values) or sum(values) <= 0:
                raise ValueError(f"--split must be up to 3 non-negative numbers, got "
                                 f"{self.split!r}")


@dataclass
class OptimConfig:
    """Adam through megatron-core's optimizer, and the LR schedule.

    Attributes:
        lr / min_lr: peak and floor LR (`--lr`, `--min-lr`); paper: 2e-5 constant.
        lr_warmup_iters: linear warmup from 0 (`--lr-warmup-iters`).
        lr_decay_style: constant | cosine | linear (`--lr-decay-style`).
        lr_decay_iters: decay length (`--lr-decay-iters`), default --train-iters.
        weight_decay: decoupled (AdamW) weight decay (`--weight-decay`).
        clip_grad: global gradient-norm clip (`--clip-grad`); 0 disables.
        adam_beta1 / adam_beta2 / adam_eps: `--adam-beta1`, `--adam-beta2`, `--adam-eps`.
        use_distributed_optimizer: shard optimizer state over data parallel ranks
            (`--use-distributed-optimizer`): LLaMA-2 7B's fp32 master + Adam state is 81 GB
            (12 bytes/param), 10 GB per rank at DP 8.
    """

    lr: float = option(2e-5, Flag("--lr", "peak learning rate (paper: 2e-5)"))
    min_lr: float = option(0.0, Flag("--min-lr", "LR floor of the decay"))
    lr_warmup_iters: int = option(0, Flag("--lr-warmup-iters", "linear warmup from 0"))
    lr_decay_style: str = option("constant", Flag(
        "--lr-decay-style", "constant | cosine | linear"))
    lr_decay_iters: int | None = option(None, Flag(
        "--lr-decay-iters", "decay length (default: --train-iters)"))
    weight_decay: float = option(0.0, Flag("--weight-decay", "decoupled (AdamW) weight decay"))
    clip_grad: float = option(1.0, Flag("--clip-grad", "global gradient-norm clip; 0 disables"))
    adam_beta1: float = option(0.9, Flag("--adam-beta1", "Adam beta1"))
    adam_beta2: float = option(0.95, Flag("--adam-beta2", "Adam beta2"))
    adam_eps: float = option(1e-8, Flag("--adam-eps", "Adam epsilon"))
    use_distributed_optimizer: bool = option(False, Flag(
        "--use-distributed-optimizer", "shard optimizer state over data-parallel ranks",
        group="parallel"))

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr ({self.min_lr}) must be in [0, --lr ({self.lr})]")
        if self.lr_warmup_iters < 0:
            raise ValueError(f"--lr-warmup-iters must be >= 0, got {self.lr_warmup_iters}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style must be one of {LR_DECAY_STYLES}, got "
                             f"{self.lr_decay_style!r}")
        if self.lr_decay_iters is not None and self.lr_decay_iters <= 0:
            raise ValueError(f"--lr-decay-iters must be positive, got {self.lr_decay_iters}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad < 0:
            raise ValueError(f"--clip-grad must be >= 0, got {self.clip_grad}")
        for flag, beta in (("--adam-beta1", self.adam_beta1), ("--adam-beta2", self.adam_beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"{flag} must be in [0, 1), got {beta}")
        if self.adam_eps <= 0:
            raise ValueError(f"--adam-eps must be positive, got {self.adam_eps}")


@dataclass
class TrainingConfig:
    """Batching, iterations, recompute, evaluation and run control.

    Attributes:
        micro_batch_size / global_batch_size: `--micro-batch-size`, `--global-batch-size`;
            micro-batches per step = global / (micro * DP) (gradient accumulation).
        train_iters: optimizer steps (`--train-iters`).
        seed: `--seed`.
        eval_interval / eval_iters: validation every N steps over M batches (0 = never).
        recompute_granularity / recompute_method / recompute_num_layers: activation
            recompute (`--recompute-*`); at 128K, full recompute of every layer keeps only the
            layer inputs (s*b*h*2 bytes per layer: 1 GB for 7B at 128K/CP1, bf16).
        on_nan_loss: stop | skip when the loss is NaN/Inf (`--on-nan-loss`); skip drops the
            update and counts it; stop exits with EXIT_NAN.
        exit_duration_in_mins: save and exit (EXIT_REQUEUE) after this wall time.
        exit_signal_handler: save and exit (EXIT_REQUEUE) on SIGTERM/SIGUSR1.
        exit_interval: stop after the iteration divisible by this (`--exit-interval`).
        calculate_per_token_loss: `--calculate-per-token-loss` (the default here): the loss
            and its gradient are the sum over every unmasked token of the global batch divided
            by their count, whatever the micro-batching and DP/CP layout. With document
            masking, --eod-mask-loss and THD pads, micro-batches hold different numbers of
            loss tokens, so Megatron-LM's default (each micro-batch's mean, averaged over
            micro-batches and DP ranks; `--no-calculate-per-token-loss`) changes with gradient
            accumulation and the DP size. The logged loss is the per-token ratio either way,
            as in Megatron-LM.
    """

    micro_batch_size: int = option(1, Flag(
        "--micro-batch-size", "sequences per micro-batch per data-parallel rank"))
    global_batch_size: int | None = option(None, Flag(
        "--global-batch-size", "sequences per optimizer step (default: micro-batch x DP)"))
    train_iters: int = option(1, Flag("--train-iters", "optimizer steps", required=True))
    seed: int = option(1234, Flag("--seed", "random seed"))
    eval_interval: int = option(0, Flag("--eval-interval", "validate every N steps (0: never)"))
    eval_iters: int = option(0, Flag("--eval-iters", "batches per validation"))
    recompute_granularity: str | None = option(None, Flag(
        "--recompute-granularity", "activation recompute: full | selective"))
    recompute_method: str | None = option(None, Flag(
        "--recompute-method", "with full: uniform | block"))
    recompute_num_layers: int | None = option(None, Flag(
        "--recompute-num-layers", "layers per recompute unit (uniform) or recomputed (block)"))
    fine_grained_activation_offloading: bool = option(False, Flag(
        "--fine-grained-activation-offloading", "megatron-core's activation offloading: the "
        "inputs of --offload-modules go to host memory in forward (CUDA only)"))
    offload_modules: list[str] | None = option(None, Flag(
        "--offload-modules", "with --fine-grained-activation-offloading: attn_norm qkv_linear "
        "core_attn attn_proj mlp_norm (attn_proj needs core_attn)"))
    on_nan_loss: str = option("stop", Flag("--on-nan-loss", "stop | skip"))
    exit_duration_in_mins: float | None = option(None, Flag(
        "--exit-duration-in-mins", f"save and exit {EXIT_REQUEUE} after this wall time"))
    exit_signal_handler: bool = option(False, Flag(
        "--exit-signal-handler", f"save and exit {EXIT_REQUEUE} on SIGTERM/SIGUSR1"))
    exit_interval: int | None = option(None, Flag(
        "--exit-interval", "stop after the iteration divisible by this"))
    calculate_per_token_loss: bool | None = option(None, Flag(
        "--calculate-per-token-loss", "loss = sum over the global batch's loss tokens / their "
        "count (default: on)", negative="--no-calculate-per-token-loss"))

    def per_token_loss(self) -> bool:
        """--calculate-per-token-loss resolved (None = on)."""
        return self.calculate_per_token_loss is not False
    # Long runs: garbage collection and collective timeout (Megatron-LM's flags).
    manual_gc: bool = option(False, Flag(
        "--manual-gc", "disable Python's automatic GC; collect at the same steps on every "
        "rank (and around validation)"))
    manual_gc_interval: int = option(0, Flag(
        "--manual-gc-interval", "with --manual-gc: collect every N steps (0: only around "
        "validation)"))
    manual_gc_eval: bool = option(True, Flag(
        "--no-manual-gc-eval", "with --manual-gc: no collection around validation",
        action="store_false"))
    distributed_timeout_minutes: int = option(30, Flag(
        "--distributed-timeout-minutes", "collective timeout of the process groups "
        "(Megatron-LM's default is 10)", group="parallel"))

    def validate(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError(f"--global-batch-size must be >= 1, got {self.global_batch_size}")
        if self.train_iters < 1:
            raise ValueError(f"--train-iters must be >= 1, got {self.train_iters}")
        if self.eval_interval < 0 or self.eval_iters < 0:
            raise ValueError("--eval-interval and --eval-iters must be >= 0")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError("--recompute-granularity must be full or selective, got "
                             f"{self.recompute_granularity!r}")
        if self.recompute_method not in (None, "uniform", "block"):
            raise ValueError(f"--recompute-method must be uniform or block, got "
                             f"{self.recompute_method!r}")
        if self.recompute_granularity == "full" and self.recompute_method is None:
            raise ValueError("--recompute-granularity full needs --recompute-method "
                             "uniform|block and --recompute-num-layers")
        if self.recompute_method is not None and self.recompute_granularity != "full":
            raise ValueError("--recompute-method needs --recompute-granularity full")
        if self.recompute_method and (self.recompute_num_layers or 0) < 1:
            raise ValueError("--recompute-method needs --recompute-num-layers >= 1")
        offload = self.offload_modules or []
        if self.fine_grained_activation_offloading and not offload:
            raise ValueError("--fine-grained-activation-offloading needs --offload-modules")
        if offload and not self.fine_grained_activation_offloading:
            raise ValueError("--offload-modules needs --fine-grained-activation-offloading")
        bad = sorted(set(offload) - set(OFFLOAD_MODULES))
        if bad:
            raise ValueError(f"--offload-modules: {' '.join(bad)} not in {OFFLOAD_MODULES}")
        if "attn_proj" in offload and "core_attn" not in offload:
            raise ValueError("--offload-modules attn_proj needs core_attn too (the projection's "
                             "input is core attention's output)")
        if self.on_nan_loss not in NAN_POLICIES:
            raise ValueError(f"--on-nan-loss must be one of {NAN_POLICIES}, got "
                             f"{self.on_nan_loss!r}")
        if self.exit_duration_in_mins is not None and self.exit_duration_in_mins <= 0:
            raise ValueError("--exit-duration-in-mins must be positive")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise ValueError("--exit-interval must be >= 1")
        if self.manual_gc_interval < 0:
            raise ValueError(f"--manual-gc-interval must be >= 0, got {self.manual_gc_interval}")
        if self.distributed_timeout_minutes < 1:
            raise ValueError("--distributed-timeout-minutes must be >= 1, got "
                             f"{self.distributed_timeout_minutes}")


@dataclass
class CheckpointConfig:
    """dist_checkpointing save/load (docs/checkpoint-format.md).

    Attributes:
        save / load: checkpoint roots (`--save`, `--load`); resuming a preempted job uses the
            same directory for both.
        save_interval: save every N iterations (`--save-interval`); a final save always happens
            when --save is set.
        no_load_optim / no_load_rng: `--no-load-optim`, `--no-load-rng`.
        finetune: load model weights only and start at iteration 0 (`--finetune`); automatic
            for model-only checkpoints (converted from HF).
    """

    save: str | None = option(None, Flag("--save", "checkpoint root to save to"))
    load: str | None = option(None, Flag("--load", "checkpoint root (or iter_ dir) to load"))
    save_interval: int | None = option(None, Flag(
        "--save-interval", "save every N iterations (and always at the end with --save)"))
    no_load_optim: bool = option(False, Flag(
        "--no-load-optim", "load weights and schedule, not the optimizer state"))
    no_load_rng: bool = option(False, Flag("--no-load-rng", "do not restore RNG states"))
    finetune: bool = option(False, Flag(
        "--finetune", "load model weights only and start at iteration 0"))
    # Saves that do not stop training, and disk that does not fill.
    async_save: bool = option(False, Flag(
        "--async-save", "write periodic saves in a background process while training "
        "continues (torch_dist format); the marker moves when every rank has finished"))
    keep_last_checkpoints: int | None = option(None, Flag(
        "--keep-last-checkpoints", "keep only the N newest complete checkpoints (older ones "
        "are deleted after a newer one is marked latest); default: keep all"))
    keep_checkpoints_every: int | None = option(None, Flag(
        "--keep-checkpoints-every", "with --keep-last-checkpoints: also keep every iteration "
        "divisible by K"))

    def validate(self) -> None:
        if self.save_interval is not None:
            if self.save_interval < 1:
                raise ValueError(f"--save-interval must be >= 1, got {self.save_interval}")
            if not self.save:
                raise ValueError("--save-interval needs --save DIR")
        for flag, value in (("--keep-last-checkpoints", self.keep_last_checkpoints),
                            ("--keep-checkpoints-every", self.keep_checkpoints_every)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.keep_checkpoints_every is not None and self.keep_last_checkpoints is None:
            raise ValueError("--keep-checkpoints-every needs --keep-last-checkpoints N")
        for flag, on in (("--async-save", self.async_save),
                         ("--keep-last-checkpoints", self.keep_last_checkpoints)):
            if on and not self.save:
                raise ValueError(f"{flag} needs --save DIR")


@dataclass
class LoggingConfig:
    """Console, TensorBoard, Weights & Biases and the profiler.

    The optional series (`--log-throughput`, `--log-memory-to-tensorboard`,
    `--log-timers-to-tensorboard`, `--log-params-norm`, `--log-num-zeros-in-grad`) and their
    tags are listed in training/metrics.py and docs/training.md; W&B receives every value
    TensorBoard does. The profiler covers the steps whose iteration count before the step is
    in [--profile-step-start, --profile-step-end) on --profile-ranks (Megatron-LM's window).
    """

    log_interval: int = option(1, Flag("--log-interval", "iterations between log lines"))
    tensorboard_dir: str | None = option(None, Flag(
        "--tensorboard-dir", "TensorBoard event directory"))
    peak_tflops: float | None = option(None, Flag(
        "--peak-tflops", "per-device peak for MFU (default: from the GPU name)"))
    # The series Megatron-LM users read, Weights & Biases and profiling (Megatron-LM's flags).
    log_throughput: bool = option(False, Flag(
        "--log-throughput", "log achieved TFLOP/s per device (`throughput`)"))
    log_memory_to_tensorboard: bool = option(False, Flag(
        "--log-memory-to-tensorboard", "log memory per logged step (CUDA allocator, host RSS)"))
    log_timers_to_tensorboard: bool = option(False, Flag(
        "--log-timers-to-tensorboard", "log forward-backward, optimizer, batch-generator and "
        "save-checkpoint times"))
    log_params_norm: bool = option(False, Flag(
        "--log-params-norm", "log the L2 norm of all parameters (one all-reduce per log)"))
    log_num_zeros_in_grad: bool = option(False, Flag(
        "--log-num-zeros-in-grad", "log the number of zero gradient elements"))
    wandb_project: str | None = option(None, Flag(
        "--wandb-project", "Weights & Biases project (enables W&B logging on the last rank; "
        "WANDB_MODE=offline writes the run to disk)"))
    wandb_exp_name: str | None = option(None, Flag("--wandb-exp-name", "W&B run name"))
    wandb_save_dir: str | None = option(None, Flag(
        "--wandb-save-dir", "W&B run directory (default: SAVE/wandb, else ./wandb)"))
    wandb_entity: str | None = option(None, Flag("--wandb-entity", "W&B team or user"))
    profile: bool = option(False, Flag(
        "--profile", "profile steps --profile-step-start..--profile-step-end (nsys range "
        "markers on CUDA; with --use-pytorch-profiler a torch.profiler trace)"))
    use_pytorch_profiler: bool = option(False, Flag(
        "--use-pytorch-profiler", "with --profile: write a torch.profiler trace to "
        "--tensorboard-dir"))
    profile_step_start: int = option(10, Flag(
        "--profile-step-start", "first profiled step (the iteration count before it)"))
    profile_step_end: int = option(12, Flag(
        "--profile-step-end", "profiling stops before this step"))
    profile_ranks: list[int] = option(flag=Flag("--profile-ranks", "global ranks to profile"),
                                      default_factory=lambda: [0])

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ValueError(f"--log-interval must be >= 1, got {self.log_interval}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError("--peak-tflops must be positive")
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            raise ValueError("--wandb-project needs the wandb package (pip install wandb, or "
                             "this package's [wandb] extra)")
        if self.use_pytorch_profiler and not self.profile:
            raise ValueError("--use-pytorch-profiler needs --profile")
        if self.profile:
            if not 0 <= self.profile_step_start < self.profile_step_end:
                raise ValueError(
                    f"--profile-step-start ({self.profile_step_start}) must be >= 0 and below "
                    f"--profile-step-end ({self.profile_step_end})")
            if self.use_pytorch_profiler and not self.tensorboard_dir:
                raise ValueError("--use-pytorch-profiler needs --tensorboard-dir (the trace "
                                 "is written there)")


#: First Transformer Engine release whose context-parallel attention takes THD (packed
#: documents) for each --cp-comm-type; a2a+p2p takes THD in no release.
THD_CP_MIN_TE = {"p2p": "2.7", "a2a": "2.10", "all_gather": "2.18"}


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_document_masking_support(impl: str, cp: int, cp_comm_type: str,
                                   fp8_dot_product_attention: bool,
                                   te_version: str | None) -> None:
    """The support matrix of --reset-attention-mask (THD micro-batches).

    Local spec: every layout (the SDPA twin). Transformer Engine: FP8 attention has no THD
    backend (Hopper, TE <= 2.18; FP8 linear layers are fine); with CP > 1 the THD path exists
    for p2p from TE 2.7, a2a from 2.10, all_gather from 2.18, a2a+p2p in no release.

    Raises:
        ValueError: one line naming the flag.
    """
    if impl != "transformer_engine":
        return
    if fp8_dot_product_attention:
        raise ValueError("--fp8-dot-product-attention cannot be used with "
                         "--reset-attention-mask: Transformer Engine has no FP8 attention "
                         "backend for packed (THD) documents (FP8 linear layers are fine)")
    if cp <= 1:
        return
    if cp_comm_type not in THD_CP_MIN_TE:
        raise ValueError(f"--cp-comm-type {cp_comm_type} cannot be used with "
                         "--reset-attention-mask: no Transformer Engine release supports "
                         "packed (THD) documents with it; use p2p, a2a or all_gather")
    need = THD_CP_MIN_TE[cp_comm_type]
    if te_version is not None and _version_tuple(te_version) < _version_tuple(need):
        raise ValueError(f"--cp-comm-type {cp_comm_type} with --reset-attention-mask needs "
                         f"transformer-engine >= {need} (installed: {te_version})")


@dataclass
class PretrainConfig:
    """Everything `pretrain_longctx.py` needs, validated together by `validate()`."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)  # --dry-run (megatron_longctx/plan)
    attention_backend: str | None = option(None, Flag(
        "--attention-backend", "TE attention backend: auto | fused | flash | unfused | local",
        group="precision"))
    model_preset: str | None = option(None, Flag(
        "--model-preset", f"{' | '.join(PRESET_NAMES)}", group="model"))
    padded_vocab_size: int | None = option(None, Flag(
        "--padded-vocab-size", "embedding rows instead of the padded tokenizer vocabulary "
        "(>= the tokenizer's, divisible by TP)", group="model"))

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.parallel.model_parallel_size

    def global_batch_size(self, world_size: int) -> int:
        """--global-batch-size, default micro-batch x data-parallel size (no accumulation)."""
        return (self.training.global_batch_size
                or self.training.micro_batch_size * self.data_parallel_size(world_size))

    def num_microbatches(self, world_size: int) -> int:
        return self.global_batch_size(world_size) // (
            self.training.micro_batch_size * self.data_parallel_size(world_size))

    def validate(self, world_size: int, te_available: bool = False,
                 te_version: str | None = None) -> None:
        """All checks, in the order a user would fix them; world-size checks last.

        `te_version`: the installed transformer-engine version (document masking support
        depends on it), None when unknown."""
        validate_all(self.model, self.parallel, self.precision, te_available=te_available,
                     world_size=world_size)
        for part in (self.data, self.optim, self.training, self.checkpoint, self.logging,
                     self.plan):
            part.validate()
        dp = self.data_parallel_size(world_size)
        gbs, mbs = self.global_batch_size(world_size), self.training.micro_batch_size
        if gbs % (mbs * dp):
            raise ValueError(
                f"--global-batch-size ({gbs}) must be divisible by --micro-batch-size ({mbs}) "
                f"x data-parallel size ({dp} = world {world_size} / TP*PP*CP "
                f"{self.parallel.model_parallel_size})"
            )
        vpp = self.parallel.virtual_pipeline_model_parallel_size or 1
        pp = self.parallel.pipeline_model_parallel_size
        if vpp > 1 and self.num_microbatches(world_size) % pp:
            raise ValueError(
                "with virtual pipeline stages, micro-batches per step "
                f"({self.num_microbatches(world_size)} = --global-batch-size / "
                "(--micro-batch-size x DP)) must be divisible by --pipeline-model-parallel-size "
                f"({self.parallel.pipeline_model_parallel_size})"
            )
        if self.training.recompute_num_layers and self.training.recompute_method == "block":
            per_stage = self.model.num_layers // (self.parallel.pipeline_model_parallel_size * vpp)
            if self.training.recompute_num_layers > per_stage:
                raise ValueError(f"--recompute-num-layers ({self.training.recompute_num_layers})"
                                 f" exceeds the layers per pipeline stage ({per_stage})")
        impl = self.precision.implementation(te_available)
        if self.data.reset_position_ids and not self.data.reset_attention_mask:
            raise ValueError("--reset-position-ids needs --reset-attention-mask (positions "
                             "restart per document of the packed THD micro-batch)")
        pad = self.data.document_pad_multiple
        if pad is not None:
            cp = self.parallel.context_parallel_size
            if pad < 1 or (cp > 1 and pad % (2 * cp)) or self.model.seq_length % pad:
                raise ValueError(
                    f"--document-pad-multiple ({pad}) must be a positive multiple of 2 x "
                    f"--context-parallel-size ({2 * cp if cp > 1 else 1}) dividing --seq-length "
                    f"({self.model.seq_length})")
        if self.data.reset_attention_mask:
            check_document_masking_support(
                impl, self.parallel.context_parallel_size, self.parallel.cp_comm_type,
                self.precision.fp8_dot_product_attention, te_version)
            if self.parallel.pipeline_model_parallel_size > 1 and mbs > 1:
                raise ValueError(
                    f"--reset-attention-mask with --pipeline-model-parallel-size > 1 needs "
                    f"--micro-batch-size 1 (got {mbs}): a THD micro-batch is one packed row, "
                    "and the pipeline's p2p shapes are [seq / CP, micro-batch, hidden]")
        if (self.attention_backend not in (None, "auto", "local")
                and impl != "transformer_engine"):
            raise ValueError(f"--attention-backend {self.attention_backend} needs "
                                 "--transformer-impl transformer_engine")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
#: argument groups of `--help`, in order; each config section / Flag.group key has one.
PRETRAIN_GROUPS = {
    "model": "model (defaults from --model-preset)", "data": "data",
    "training": "training", "optim": "training", "parallel": "parallelism",
    "precision": "precision and kernels", "checkpoint": "checkpoints", "logging": "logging",
    "plan": "memory/time estimate (--dry-run)",
}
#: Megatron-LM switches that are not config fields: (flag, argparse kwargs). Translated by
#: `_compat_settings` (--bf16/--fp16, --num-layers-per-virtual-pipeline-stage) and
#: `_check_fixed_architecture` (the LLaMA-only ones, checked rather than ignored).
MEGATRON_COMPAT_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("model", "--group-query-attention",
     {"action": "store_true", "help": "GQA (with --num-query-groups)"}),
    ("model", "--normalization",
     {"default": "RMSNorm", "metavar": "NORM", "help": "only RMSNorm (LLaMA)"}),
    ("model", "--swiglu", {"action": "store_true", "help": "always on (LLaMA MLP); accepted"}),
    ("model", "--disable-bias-linear",
     {"action": "store_true", "help": "always on (LLaMA has no biases); accepted"}),
    ("model", "--position-embedding-type",
     {"default": "rope", "metavar": "TYPE", "help": "only rope (LLaMA)"}),
    ("parallel", "--num-layers-per-virtual-pipeline-stage",
     {"type": int, "default": None, "metavar": "N",
      "help": "interleaved 1F1B: layers per virtual stage"}),
    ("precision", "--bf16", {"action": "store_true", "help": "bf16 parameters"}),
    ("precision", "--fp16", {"action": "store_true", "help": "fp16 parameters"}),
)


def build_pretrain_parser() -> argparse.ArgumentParser:
    """Megatron-LM's pretrain_gpt flag names (the subset this fork implements) plus ours.

    Every flag but the Megatron-LM switches in MEGATRON_COMPAT_FLAGS comes from a config field
    (config/flags.py); the dests are the fields' dotted paths (`parallel.context_parallel_size`).
    """
    parser = argparse.ArgumentParser(
        prog="pretrain_longctx.py",
        description="Long-context continual pretraining of LLaMA models on megatron-core",
        allow_abbrev=False,
    )
    add_config_flags(parser, PretrainConfig, titles=PRETRAIN_GROUPS,
                     default_notes={"model": "the --model-preset's"})
    groups = parser._config_groups  # type: ignore[attr-defined]
    for group, flag, kwargs in MEGATRON_COMPAT_FLAGS:
        dest = "compat." + flag.lstrip("-").replace("-", "_")
        groups[group].add_argument(flag, dest=dest, **kwargs)
    return parser


def _compat(a: argparse.Namespace, flag: str) -> Any:
    return getattr(a, "compat." + flag.lstrip("-").replace("-", "_"))


def _check_fixed_architecture(a: argparse.Namespace, model: dict[str, Any],
                              preset: str | None) -> None:
    """The LLaMA-only Megatron flags: checked, not ignored."""
    if _compat(a, "--normalization") != "RMSNorm":
        raise ValueError(f"--normalization {_compat(a, '--normalization')}: only RMSNorm "
                         "(LLaMA) is supported")
    if _compat(a, "--position-embedding-type") != "rope":
        raise ValueError(f"--position-embedding-type {_compat(a, '--position-embedding-type')}: "
                         "only rope (LLaMA) is supported")
    gqa = _compat(a, "--group-query-attention")
    if "num_query_groups" in model and not gqa:
        raise ValueError("--num-query-groups needs --group-query-attention")
    if gqa and "num_query_groups" not in model and not preset:
        raise ValueError("--group-query-attention needs --num-query-groups")


def _model_from_args(a: argparse.Namespace) -> ModelConfig:
    """The preset (or the architecture flags) with the given model flags on top."""
    from megatron_longctx.config.presets import get_preset

    preset = getattr(a, "model_preset", None)
    updates = given(a, "model")
    _check_fixed_architecture(a, updates, preset)
    if preset:
        base = get_preset(preset)
    else:
        missing = [flag for flag, name in (("--num-layers", "num_layers"),
                                           ("--hidden-size", "hidden_size"),
                                           ("--num-attention-heads", "num_attention_heads"))
                   if name not in updates]
        if missing:
            raise ValueError(f"give --model-preset or the architecture ({', '.join(missing)} "
                             "missing)")
        hidden = updates["hidden_size"]
        base = ModelConfig(
            num_layers=updates["num_layers"], hidden_size=hidden,
            ffn_hidden_size=updates.get("ffn_hidden_size", 4 * hidden),
            num_attention_heads=updates["num_attention_heads"],
            untie_embeddings_and_output_weights=False,  # Megatron's default: tied
        )
    seq = updates.get("seq_length", base.seq_length)
    updates.setdefault("max_position_embeddings", max(seq, base.max_position_embeddings))
    return dataclasses.replace(base, **updates)


def _virtual_stages(a: argparse.Namespace, model: ModelConfig) -> int | None:
    """--num-layers-per-virtual-pipeline-stage -> model chunks per PP rank (None for 1)."""
    per_stage = _compat(a, "--num-layers-per-virtual-pipeline-stage")
    if per_stage is None:
        return None
    if per_stage < 1:
        raise ValueError("--num-layers-per-virtual-pipeline-stage must be >= 1")
    pp = getattr(a, "parallel.pipeline_model_parallel_size", 1)
    if model.num_layers % (pp * per_stage):
        raise ValueError(
            f"--num-layers ({model.num_layers}) must be divisible by "
            f"--pipeline-model-parallel-size ({pp}) x "
            f"--num-layers-per-virtual-pipeline-stage ({per_stage})")
    vpp = model.num_layers // (pp * per_stage)
    return vpp if vpp > 1 else None


def config_from_args(a: argparse.Namespace) -> PretrainConfig:
    """Namespace -> PretrainConfig: generic for every field flag (config/flags.py), plus the
    model preset and the Megatron switches; no validation beyond what translation needs.

    `precision.transformer_impl` stays None without --transformer-impl ("TE when importable"):
    probing TE imports it, which the entrypoint does only after CUDA_DEVICE_MAX_CONNECTIONS is
    set; `PretrainConfig.validate(te_available=...)` and `resolve_runtime` resolve it.
    """
    if _compat(a, "--bf16") and _compat(a, "--fp16"):
        raise ValueError("--bf16 and --fp16 are exclusive")
    model = _model_from_args(a)
    dtype = "bf16" if _compat(a, "--bf16") else "fp16" if _compat(a, "--fp16") else "fp32"
    fixed = {"model": model, "precision.params_dtype": dtype,
             "parallel.virtual_pipeline_model_parallel_size": _virtual_stages(a, model)}
    return config_from_namespace(PretrainConfig, a, fixed=fixed)


def parse_pretrain_args(argv: list[str] | None = None) -> PretrainConfig:
    """Parse the command line into a PretrainConfig; usage errors exit 2 naming the flag."""
    parser = build_pretrain_parser()
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


# --------------------------------------------------------------------------------------------
# resolution: what the command line leaves to the machine and the tokenizer
# --------------------------------------------------------------------------------------------
def resolve_vocabulary(cfg: PretrainConfig, tokenizer_vocab: int) -> ModelConfig:
    """The model with the tokenizer's vocabulary, as the trainer builds it (pure; a new object).

    The model's vocabulary is the tokenizer's, padded to a multiple of
    --make-vocab-size-divisible-by x TP (a preset's vocab_size is only a default), or exactly
    --padded-vocab-size rows when given (which must hold every token id and split over TP). Either
    way `vocab_size` stays the tokenizer's, so the loss excludes every padding row (model/loss.py).
    Idempotent: resolving a resolved config returns an equal model.
    """
    explicit, tp = cfg.padded_vocab_size, cfg.parallel.tensor_model_parallel_size
    if explicit is None:
        return dataclasses.replace(cfg.model, vocab_size=tokenizer_vocab, pad_vocab=True)
    if explicit < tokenizer_vocab:
        raise ValueError(f"--padded-vocab-size ({explicit}) must be >= the tokenizer's "
                         f"vocabulary ({tokenizer_vocab})")
    if explicit % tp:
        raise ValueError(f"--padded-vocab-size ({explicit}) must be divisible by "
                         f"--tensor-model-parallel-size ({tp})")
    return dataclasses.replace(cfg.model, vocab_size=tokenizer_vocab, pad_vocab=True,
                               padded_vocab_rows=explicit)


def resolve_runtime(cfg: PretrainConfig, *, te_available: bool,
                    tokenizer_vocab: int) -> PretrainConfig:
    """A new PretrainConfig with the auto settings resolved; `cfg` is left unchanged.

    `--transformer-impl` None -> transformer_engine when TE imports, else local; the model's
    vocabulary from the tokenizer (`resolve_vocabulary`). The entrypoint resolves before it
    validates, so nothing replaces a validated config later.
    """
    precision = dataclasses.replace(
        cfg.precision, transformer_impl=cfg.precision.implementation(te_available))
    return dataclasses.replace(cfg, model=resolve_vocabulary(cfg, tokenizer_vocab),
                               precision=precision)
