"""The pretrain entrypoint's configuration: Megatron-LM flags -> typed, validated dataclasses.

`parse_pretrain_args(argv)` is the only place that knows the command line. It reads Megatron-LM's
flag names (so an existing launch script's flags carry over), fills architecture defaults from a
named preset (`--model-preset`), and returns a `PretrainConfig` whose `validate()` checks every
constraint before any process group or tensor exists; each message names the flag to change.

Flags accepted for compatibility whose value is fixed in this fork (LLaMA only) are checked, not
ignored: `--normalization` must be RMSNorm, `--position-embedding-type` rope; `--swiglu` and
`--disable-bias-linear` describe what the model always is.

RoPE and long context (which to use when):
* `--rotary-base B`: raise the base before continual pretraining at a longer length. Fu et al.
  continue LLaMA-2 (base 1e4) at 80K with an effective base of ~2.1M (the released 7B: dynamic
  NTK, factor 10); any base that keeps the lowest frequency's wavelength above 128K works. This
  is the recipe's default and needs training to adapt (0.5-5B tokens).
* `--rotary-seq-len-interpolation-factor F`: linear position interpolation (positions / F):
  extends a model by F with little or no training, at some cost in short-context resolution.
* `--use-rope-scaling --rope-scaling-factor F`: LLaMA-3.1's frequency-dependent scaling (high
  frequencies kept, low ones divided by F); use it to continue a LLaMA-3.1-style checkpoint that
  was trained with it. megatron-core 0.16.1's GPTModel has no YaRN for dense models, so YaRN is
  not offered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from megatron_longctx.config.model import ModelConfig, ParallelConfig, PrecisionConfig, validate_all

LR_DECAY_STYLES = ("constant", "cosine", "linear")
NAN_POLICIES = ("stop", "skip")
TOKENIZER_TYPES = ("HuggingFaceTokenizer", "NullTokenizer")

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
        eod_mask_loss: no loss on EOD tokens (`--eod-mask-loss`).
        data_cache_path: where megatron caches sample indices (`--data-cache-path`).
    """

    mixture_plan: str | None = None
    data_path: list[str] | None = None
    data_args_path: str | None = None
    per_split_data_args_path: str | None = None
    mock_data: bool = False
    split: str = "969,30,1"
    tokenizer_type: str = "HuggingFaceTokenizer"
    tokenizer_model: str | None = None
    vocab_size: int | None = None
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    data_cache_path: str | None = None

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
        if self.tokenizer_type == "NullTokenizer":
            if not self.vocab_size or self.vocab_size < 2:
                raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size >= 2")
        elif not self.tokenizer_model and not self.mixture_plan:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR "
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

    lr: float = 2e-5
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: str = "constant"
    lr_decay_iters: int | None = None
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    use_distributed_optimizer: bool = False

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
    """

    micro_batch_size: int = 1
    global_batch_size: int | None = None
    train_iters: int = 1
    seed: int = 1234
    eval_interval: int = 0
    eval_iters: int = 0
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    on_nan_loss: str = "stop"
    exit_duration_in_mins: float | None = None
    exit_signal_handler: bool = False
    exit_interval: int | None = None

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
        if self.on_nan_loss not in NAN_POLICIES:
            raise ValueError(f"--on-nan-loss must be one of {NAN_POLICIES}, got "
                             f"{self.on_nan_loss!r}")
        if self.exit_duration_in_mins is not None and self.exit_duration_in_mins <= 0:
            raise ValueError("--exit-duration-in-mins must be positive")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise ValueError("--exit-interval must be >= 1")


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

    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False

    def validate(self) -> None:
        if self.save_interval is not None:
            if self.save_interval < 1:
                raise ValueError(f"--save-interval must be >= 1, got {self.save_interval}")
            if not self.save:
                raise ValueError("--save-interval needs --save DIR")


@dataclass
class LoggingConfig:
    """Console and TensorBoard (`--log-interval`, `--tensorboard-dir`, `--peak-tflops`)."""

    log_interval: int = 1
    tensorboard_dir: str | None = None
    peak_tflops: float | None = None

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ValueError(f"--log-interval must be >= 1, got {self.log_interval}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError("--peak-tflops must be positive")


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
    attention_backend: str | None = None
    model_preset: str | None = None

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.parallel.model_parallel_size

    def global_batch_size(self, world_size: int) -> int:
        """--global-batch-size, default micro-batch x data-parallel size (no accumulation)."""
        return (self.training.global_batch_size
                or self.training.micro_batch_size * self.data_parallel_size(world_size))

    def num_microbatches(self, world_size: int) -> int:
        return self.global_batch_size(world_size) // (
            self.training.micro_batch_size * self.data_parallel_size(world_size))

    def validate(self, world_size: int, te_available: bool = False) -> None:
        """All checks, in the order a user would fix them; world-size checks last."""
        validate_all(self.model, self.parallel, self.precision, te_available=te_available,
                     world_size=world_size)
        for part in (self.data, self.optim, self.training, self.checkpoint, self.logging):
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
        if self.data.reset_attention_mask and \
                self.precision.transformer_impl == "transformer_engine":
            # TE's attention forwards only the base PackedSeqParams fields (our document
            # starts would be dropped: plain causal attention), and at CP > 1 it multiplies
            # max_seqlen by the CP size again. THD packing for TE is not built yet.
            raise ValueError("--reset-attention-mask needs --transformer-impl local (document "
                             "masking is not wired into Transformer Engine's attention yet)")
        if (self.attention_backend not in (None, "auto", "local")
                and self.precision.transformer_impl != "transformer_engine"):
            raise ValueError(f"--attention-backend {self.attention_backend} needs "
                                 "--transformer-impl transformer_engine")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def build_pretrain_parser() -> argparse.ArgumentParser:
    """Megatron-LM's pretrain_gpt flag names (the subset this fork implements) plus ours."""
    p = argparse.ArgumentParser(
        prog="pretrain_longctx.py",
        description="Long-context continual pretraining of LLaMA models on megatron-core",
        allow_abbrev=False,
    )
    g = p.add_argument_group("model (defaults from --model-preset)")
    g.add_argument("--model-preset", default=None,
                   help="llama2-7b | llama2-13b | llama3-8b | tiny | tiny-demo | demo")
    for flag in ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
                 "--num-query-groups", "--max-position-embeddings", "--seq-length",
                 "--rotary-base", "--padded-vocab-size"):
        g.add_argument(flag, type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--normalization", default="RMSNorm")
    g.add_argument("--norm-epsilon", type=float, default=None)
    g.add_argument("--swiglu", action="store_true", help="always on (LLaMA MLP); accepted")
    g.add_argument("--disable-bias-linear", action="store_true",
                   help="always on (LLaMA has no biases); accepted")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    g.add_argument("--position-embedding-type", default="rope")
    g.add_argument("--rotary-percent", type=float, default=None)
    g.add_argument("--use-rope-scaling", action="store_true", default=None)
    g.add_argument("--rope-scaling-factor", type=float, default=None)
    g.add_argument("--rotary-seq-len-interpolation-factor", type=float, default=None)
    g.add_argument("--init-method-std", type=float, default=None)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    g = p.add_argument_group("data")
    g.add_argument("--mixture-plan", default=None, help="mixture_plan.json from blend_mixture.py")
    g.add_argument("--data-path", nargs="+", default=None)
    g.add_argument("--data-args-path", default=None)
    g.add_argument("--per-split-data-args-path", default=None)
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--tokenizer-type", default="HuggingFaceTokenizer")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--data-cache-path", default=None)

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--lr", type=float, default=2e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", default="constant")
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--eval-interval", type=int, default=0)
    g.add_argument("--eval-iters", type=int, default=0)
    g.add_argument("--recompute-granularity", default=None)
    g.add_argument("--recompute-method", default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--on-nan-loss", default="stop", help="stop | skip")
    g.add_argument("--exit-duration-in-mins", type=float, default=None)
    g.add_argument("--exit-signal-handler", action="store_true",
                   help=f"save and exit {EXIT_REQUEUE} on SIGTERM/SIGUSR1")
    g.add_argument("--exit-interval", type=int, default=None)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--cp-comm-type", default="p2p")
    g.add_argument("--hierarchical-context-parallel-sizes", type=int, nargs="+", default=None,
                   help="with --cp-comm-type a2a+p2p: a2a and p2p group sizes (product = CP)")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", dest="overlap_grad_reduce", action="store_true",
                   default=None, help="overlap the DP gradient reduction with the backward "
                   "pass (default: on with CUDA, off on CPU)")
    g.add_argument("--no-overlap-grad-reduce", dest="overlap_grad_reduce",
                   action="store_false")

    g = p.add_argument_group("precision and kernels")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--transformer-impl", default=None,
                   help="transformer_engine | local (default: TE when importable)")
    g.add_argument("--fp8-format", default=None)
    g.add_argument("--fp8-recipe", default="delayed")
    g.add_argument("--fp8-amax-history-len", type=int, default=1)
    g.add_argument("--fp8-amax-compute-algo", default="most_recent")
    g.add_argument("--fp8-dot-product-attention", action="store_true")
    g.add_argument("--attention-backend", default=None)
    g.add_argument("--no-rope-fusion", dest="apply_rope_fusion", action="store_false",
                   default=None, help="unfused RoPE (fused is the default with CUDA + TE)")
    g.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion",
                   action="store_false", default=None,
                   help="unfused weight-gradient accumulation (fused is the default with CUDA "
                   "where the kernel exists)")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU (default: from the GPU name)")
    return p


def _model_from_args(a: argparse.Namespace) -> ModelConfig:
    from megatron_longctx.config.presets import get_preset

    if a.normalization != "RMSNorm":
        raise ValueError(f"--normalization {a.normalization}: only RMSNorm (LLaMA) is supported")
    if a.position_embedding_type != "rope":
        raise ValueError(f"--position-embedding-type {a.position_embedding_type}: only rope "
                         "(LLaMA) is supported")
    if a.model_preset:
        base = get_preset(a.model_preset)
    else:
        missing = [f for f, v in (("--num-layers", a.num_layers), ("--hidden-size", a.hidden_size),
                                  ("--num-attention-heads", a.num_attention_heads)) if v is None]
        if missing:
            raise ValueError(f"give --model-preset or the architecture ({', '.join(missing)} "
                             "missing)")
        hidden = a.hidden_size
        base = ModelConfig(
            num_layers=a.num_layers, hidden_size=hidden,
            ffn_hidden_size=a.ffn_hidden_size or 4 * hidden,
            num_attention_heads=a.num_attention_heads,
            untie_embeddings_and_output_weights=False,  # Megatron's default: tied
        )
    updates: dict[str, Any] = {}
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "rotary_base", "norm_epsilon", "rotary_percent", "rope_scaling_factor",
                 "init_method_std"):
        value = getattr(a, name)
        if value is not None:
            updates[name] = value
    if a.num_query_groups is not None:
        if not a.group_query_attention:
            raise ValueError("--num-query-groups needs --group-query-attention")
        updates["num_query_groups"] = a.num_query_groups
    elif a.group_query_attention and not a.model_preset:
        raise ValueError("--group-query-attention needs --num-query-groups")
    if a.untie_embeddings_and_output_weights:
        updates["untie_embeddings_and_output_weights"] = True
    if a.use_rope_scaling:
        updates["rope_scaling"] = True
    if a.rotary_seq_len_interpolation_factor is not None:
        updates["seq_len_interpolation_factor"] = a.rotary_seq_len_interpolation_factor
    if a.seq_length is not None:
        updates["seq_length"] = a.seq_length
    seq = updates.get("seq_length", base.seq_length)
    if a.max_position_embeddings is not None:
        updates["max_position_embeddings"] = a.max_position_embeddings
    else:
        updates["max_position_embeddings"] = max(seq, base.max_position_embeddings)
    if a.padded_vocab_size is not None:
        updates["vocab_size"] = a.padded_vocab_size
    elif a.vocab_size is not None and a.tokenizer_type == "NullTokenizer":
        updates["vocab_size"] = a.vocab_size
    return dataclasses.replace(base, **updates)


def config_from_args(a: argparse.Namespace) -> PretrainConfig:
    """Namespace -> PretrainConfig (no validation beyond what translation needs)."""
    model = _model_from_args(a)
    if a.bf16 and a.fp16:
        raise ValueError("--bf16 and --fp16 are exclusive")
    vpp = None
    if a.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = a.num_layers_per_virtual_pipeline_stage
        if per_stage < 1:
            raise ValueError("--num-layers-per-virtual-pipeline-stage must be >= 1")
        pp = a.pipeline_model_parallel_size
        if model.num_layers % (pp * per_stage):
            raise ValueError(
                f"--num-layers ({model.num_layers}) must be divisible by "
                f"--pipeline-model-parallel-size ({pp}) x "
                f"--num-layers-per-virtual-pipeline-stage ({per_stage})")
        vpp = model.num_layers // (pp * per_stage)
        vpp = vpp if vpp > 1 else None
    impl = a.transformer_impl
    if impl is None:
        from megatron_longctx.model.build import te_available

        impl = "transformer_engine" if te_available() else "local"
    return PretrainConfig(
        model=model,
        model_preset=a.model_preset,
        parallel=ParallelConfig(
            tensor_model_parallel_size=a.tensor_model_parallel_size,
            pipeline_model_parallel_size=a.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=vpp,
            context_parallel_size=a.context_parallel_size,
            cp_comm_type=a.cp_comm_type,
            hierarchical_context_parallel_sizes=(
                tuple(a.hierarchical_context_parallel_sizes)
                if a.hierarchical_context_parallel_sizes else None),
            sequence_parallel=a.sequence_parallel,
            overlap_grad_reduce=a.overlap_grad_reduce,
        ),
        precision=PrecisionConfig(
            params_dtype="bf16" if a.bf16 else "fp16" if a.fp16 else "fp32",
            transformer_impl=impl,
            fp8=a.fp8_format,
            fp8_recipe=a.fp8_recipe,
            fp8_amax_history_len=a.fp8_amax_history_len,
            fp8_amax_compute_algo=a.fp8_amax_compute_algo,
            fp8_dot_product_attention=a.fp8_dot_product_attention,
            apply_rope_fusion=a.apply_rope_fusion,
            gradient_accumulation_fusion=a.gradient_accumulation_fusion,
        ),
        data=DataConfig(
            mixture_plan=a.mixture_plan, data_path=a.data_path, data_args_path=a.data_args_path,
            per_split_data_args_path=a.per_split_data_args_path, mock_data=a.mock_data,
            split=a.split, tokenizer_type=a.tokenizer_type, tokenizer_model=a.tokenizer_model,
            vocab_size=a.vocab_size, reset_attention_mask=a.reset_attention_mask,
            eod_mask_loss=a.eod_mask_loss, data_cache_path=a.data_cache_path,
        ),
        optim=OptimConfig(
            lr=a.lr, min_lr=a.min_lr, lr_warmup_iters=a.lr_warmup_iters,
            lr_decay_style=a.lr_decay_style, lr_decay_iters=a.lr_decay_iters,
            weight_decay=a.weight_decay, clip_grad=a.clip_grad, adam_beta1=a.adam_beta1,
            adam_beta2=a.adam_beta2, adam_eps=a.adam_eps,
            use_distributed_optimizer=a.use_distributed_optimizer,
        ),
        training=TrainingConfig(
            micro_batch_size=a.micro_batch_size, global_batch_size=a.global_batch_size,
            train_iters=a.train_iters, seed=a.seed, eval_interval=a.eval_interval,
            eval_iters=a.eval_iters, recompute_granularity=a.recompute_granularity,
            recompute_method=a.recompute_method, recompute_num_layers=a.recompute_num_layers,
            on_nan_loss=a.on_nan_loss, exit_duration_in_mins=a.exit_duration_in_mins,
            exit_signal_handler=a.exit_signal_handler, exit_interval=a.exit_interval,
        ),
        checkpoint=CheckpointConfig(
            save=a.save, load=a.load, save_interval=a.save_interval,
            no_load_optim=a.no_load_optim, no_load_rng=a.no_load_rng, finetune=a.finetune,
        ),
        logging=LoggingConfig(log_interval=a.log_interval, tensorboard_dir=a.tensorboard_dir,
                              peak_tflops=a.peak_tflops),
        attention_backend=a.attention_backend,
    )


def parse_pretrain_args(argv: list[str] | None = None) -> PretrainConfig:
    """Parse the command line into a PretrainConfig; usage errors exit 2 naming the flag."""
    parser = build_pretrain_parser()
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
