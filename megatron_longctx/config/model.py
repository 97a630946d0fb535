"""Typed model, parallelism and precision configs (Megatron flag names in every message).

Three dataclasses, each validated on its own and then together:

* `ModelConfig`: the LLaMA architecture (RMSNorm, SwiGLU, RoPE, untied embeddings, no biases)
  plus the RoPE scheme: `--rope-type` (HF's default | linear | dynamic | yarn | llama3 |
  longrope) with one flag per parameter, and Megatron-LM's spellings kept as aliases
  (`--use-rope-scaling` = llama3, `--rotary-seq-len-interpolation-factor` = linear).
  `ModelConfig.rope_spec()` folds them into one `RopeSpec` (model/rotary.py computes from it;
  docs/rope.md says which to use when).
* `ParallelConfig`: TP/PP/VPP/CP sizes, the CP communication type and sequence parallelism.
* `PrecisionConfig`: dtype, transformer implementation (local vs Transformer Engine) and FP8.

Configs do no I/O and import nothing heavy: `validate()` is pure and its messages name the
Megatron-LM CLI flag so a user can fix the command line directly. Each field declares its flag,
default and help once (config/flags.py); pretrain_longctx.py's parser is generated from them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from megatron_longctx.config.dtypes import PARAMS_DTYPES
from megatron_longctx.config.flags import FLAG_KEY, Flag, derived, option

CP_COMM_TYPES = ("p2p", "a2a", "all_gather", "a2a+p2p")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
FP8_AMAX_ALGOS = ("max", "most_recent")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
CROSS_ENTROPY_IMPLS = ("chunked", "megatron")


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron-LM's --make-vocab-size-divisible-by padding (multiple of divisible_by * TP)."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


#: `--rope-type` choices: HF transformers' `rope_type` names (modeling_rope_utils).
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
#: Schemes whose frequencies depend on the length of the sequence being run (HF recomputes
#: them per forward from max(position) + 1): see model/rotary.py for KV-cache decoding.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class RopeSpec:
    """One RoPE scheme with every parameter resolved (what model/rotary.py computes from).

    Built by `ModelConfig.rope_spec()` from the flags (Megatron's aliases folded in) and by the
    converter from an HF config; the names follow HF's `rope_parameters`.

    Attributes:
        rope_type: one of ROPE_TYPES.
        theta: the base (`--rotary-base`, HF `rope_theta`).
        factor: scale factor (None only for yarn/longrope, where HF then uses
            max_position_embeddings / original_max_position_embeddings).
        original_max_position_embeddings: the pretraining length the scheme extends (for
            dynamic: the length beyond which the base grows; HF takes it from
            `max_position_embeddings`).
        max_position_embeddings: the model's `--max-position-embeddings` (factor fallback).
        low_freq_factor: llama3: wavelengths above original / low are divided by factor.
        high_freq_factor: llama3: wavelengths below original / high are kept.
        beta_fast: yarn: rotations over the original length above which a pair extrapolates.
        beta_slow: yarn: rotations below which a pair is interpolated (divided by factor).
        mscale: yarn: numerator scale of the attention factor (DeepSeek style).
        mscale_all_dim: yarn: denominator scale of the attention factor.
        truncate: yarn: floor/ceil the correction range (HF default True).
        attention_factor: explicit attention scaling (yarn, longrope); None = derived.
        short_factor: longrope: per-pair divisors up to the original length.
        long_factor: longrope: per-pair divisors beyond it.
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    attention_factor: float | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    @property
    def length_dependent(self) -> bool:
        """Whether the frequencies depend on the current sequence length (dynamic, longrope)."""
        return self.rope_type in LENGTH_DEPENDENT_ROPE

    def effective_factor(self) -> float:
        """`factor`, or (yarn/longrope without one) max_position / original, as HF does."""
        if self.factor is not None:
            return float(self.factor)
        if self.max_position_embeddings and self.original_max_position_embeddings:
            return self.max_position_embeddings / self.original_max_position_embeddings
        return 1.0

    def attention_scaling(self) -> float:
        """The factor HF multiplies cos and sin by (so q.k by its square); 1 except yarn and
        longrope. YaRN: 0.1 ln(factor) + 1 (1.139 at factor 4, 1.277 at 16), or
        mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are given; LongRoPE:
        sqrt(1 + ln(factor) / ln(original)) (Phi-3 128K: 1.19)."""
        if self.rope_type not in ("yarn", "longrope"):
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        factor = self.effective_factor()
        if self.rope_type == "yarn":
            if self.mscale and self.mscale_all_dim:
                return yarn_mscale(factor, self.mscale) / yarn_mscale(factor, self.mscale_all_dim)
            return yarn_mscale(factor)
        if factor <= 1.0:
            return 1.0
        original = self.original_max_position_embeddings or 1
        return math.sqrt(1 + math.log(factor) / math.log(original))


#: Parameter field -> (flag, rope types it applies to); a flag given for another type fails.
ROPE_PARAMETER_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "rope_original_max_position_embeddings": (
        "--rope-original-max-position-embeddings", ("dynamic", "yarn", "llama3", "longrope")),
    "rope_low_freq_factor": ("--rope-low-freq-factor", ("llama3",)),
    "rope_high_freq_factor": ("--rope-high-freq-factor", ("llama3",)),
    "yarn_beta_fast": ("--yarn-beta-fast", ("yarn",)),
    "yarn_beta_slow": ("--yarn-beta-slow", ("yarn",)),
    "yarn_mscale": ("--yarn-mscale", ("yarn",)),
    "yarn_mscale_all_dim": ("--yarn-mscale-all-dim", ("yarn",)),
    "rope_attention_factor": ("--rope-attention-factor", ("yarn", "longrope")),
    "longrope_short_factor": ("--longrope-short-factor", ("longrope",)),
    "longrope_long_factor": ("--longrope-long-factor", ("longrope",)),
}


def _or(value: float | None, default: float) -> float:
    return default if value is None else float(value)


def _check_rope_flags_apply(cfg: ModelConfig, rope_type: str) -> None:
    """ValueError for a scheme parameter given with a scheme that has no such parameter."""
    for name, (flag, types) in ROPE_PARAMETER_FLAGS.items():
        if getattr(cfg, name) is not None and rope_type not in types:
            raise ValueError(f"{flag} applies to --rope-type {' / '.join(types)}, not "
                             f"{rope_type}")
    if not cfg.yarn_truncate and rope_type != "yarn":
        raise ValueError(f"--no-yarn-truncate applies to --rope-type yarn, not {rope_type}")


def _check_finite(cfg: ModelConfig) -> None:
    """ValueError naming the flag of the first float field (or float list) holding NaN or
    infinity: such a value passes every range check (`nan <= 0` is False) and surfaces only
    as "loss is nan" at step 1."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            flag = f.metadata.get(FLAG_KEY)
            name = flag.name if flag is not None else f.name
            raise ValueError(f"{name} must be a finite number, got {value}")


def validate_rope(spec: RopeSpec, rotary_dim: int) -> None:
    """Check a resolved scheme; messages name the flag (`rotary_dim`: rotated channels)."""
    kind = spec.rope_type
    if spec.theta <= 0:
        raise ValueError(f"--rotary-base must be positive, got {spec.theta}")
    if kind in ("linear", "dynamic") and spec.factor is None:
        raise ValueError(f"--rope-type {kind} needs --rope-scaling-factor")
    if spec.factor is not None and spec.factor <= 0:
        raise ValueError(f"--rope-scaling-factor must be positive, got {spec.factor}")
    if kind in ("linear", "dynamic") and spec.factor < 1:
        raise ValueError(f"--rope-scaling-factor must be >= 1 for --rope-type {kind}, got "
                         f"{spec.factor}")
    original = spec.original_max_position_embeddings
    if kind in ("dynamic", "yarn", "longrope") and original is None:
        raise ValueError(f"--rope-type {kind} needs --rope-original-max-position-embeddings "
                         "(the length the model was pretrained at)")
    if original is not None and original <= 0:
        raise ValueError(f"--rope-original-max-position-embeddings must be positive, got "
                         f"{original}")
    if kind == "llama3" and not 0 < spec.low_freq_factor < spec.high_freq_factor:
        raise ValueError(f"--rope-low-freq-factor ({spec.low_freq_factor}) must be positive "
                         f"and below --rope-high-freq-factor ({spec.high_freq_factor})")
    if spec.attention_factor is not None and spec.attention_factor <= 0:
        raise ValueError(f"--rope-attention-factor must be positive, got "
                         f"{spec.attention_factor}")
    if kind == "yarn" and not spec.beta_slow < spec.beta_fast:
        raise ValueError(f"--yarn-beta-slow ({spec.beta_slow}) must be below --yarn-beta-fast "
                         f"({spec.beta_fast})")
    if kind == "longrope":
        for flag, values in (("--longrope-short-factor", spec.short_factor),
                             ("--longrope-long-factor", spec.long_factor)):
            if values is None or len(values) != rotary_dim // 2:
                raise ValueError(f"--rope-type longrope needs {flag} with rotary dim / 2 = "
                                 f"{rotary_dim // 2} values, got "
                                 f"{0 if values is None else len(values)}")
            if min(values) <= 0:
                raise ValueError(f"{flag}: every value must be positive")


@dataclass
class ModelConfig:
    """LLaMA-class decoder shape and position encoding.

    Attributes:
        num_layers: transformer layers (`--num-layers`).
        hidden_size: model width (`--hidden-size`).
        ffn_hidden_size: SwiGLU inner width (`--ffn-hidden-size`); LLaMA-2 7B uses 11008.
        num_attention_heads: query heads (`--num-attention-heads`).
        num_query_groups: key/value heads for GQA (`--num-query-groups`); None = MHA.
        add_qkv_bias: biases on the Q/K/V projections only (`--add-qkv-bias`, Megatron-LM's
            name; Qwen2); the output projection and the MLP stay bias-free.
        kv_channels: channels per attention head (`--kv-channels`, Megatron-LM's name; HF's
            `head_dim`); None = hidden_size / num_attention_heads. Set when a model decouples
            them (heads x head_dim != hidden size): Q/K/V project hidden -> heads x kv_channels
            and the output projection back.
        vocab_size: tokenizer vocabulary (padded by the builder to a multiple of
            `make_vocab_size_divisible_by` * TP when `pad_vocab` is True, as Megatron-LM does);
            the trainer sets it from the tokenizer before validation.
        max_position_embeddings: longest sequence the RoPE table must cover
            (`--max-position-embeddings`).
        seq_length: training sequence length (`--seq-length`).
        rotary_base: RoPE base theta (`--rotary-base`). Fu et al. raise it so the base covers
            > 128K positions (LLaMA-2 10000 -> e.g. 500000 or 5M).
        rotary_percent: fraction of head dim rotated (`--rotary-percent`), 1.0 for LLaMA.
        rope_scaling: Megatron-LM's `--use-rope-scaling` = `--rope-type llama3` (factor
            default 8, original length 8192, low/high frequency factors 1/4: LLaMA-3.1).
        rope_scaling_factor: the scheme's factor (`--rope-scaling-factor`, alias
            `--rope-factor`): linear/dynamic/yarn/llama3/longrope; required except for llama3
            (8) and yarn/longrope (HF's max_position / original fallback).
        seq_len_interpolation_factor: Megatron-LM's `--rotary-seq-len-interpolation-factor F`
            = `--rope-type linear --rope-scaling-factor F`; None disables it.
        rope_type: `--rope-type`; None = from the Megatron aliases above, else default.
            dynamic (NTK) is an inference-time scheme: the base grows with the length of the
            sequence being run; training with it trains at the base for --seq-length (every
            packed sample has that length), docs/rope.md.
        rope_original_max_position_embeddings: the pretraining length a scheme extends
            (`--rope-original-max-position-embeddings`); required by dynamic, yarn, longrope;
            llama3 default 8192.
        rope_low_freq_factor: llama3 (`--rope-low-freq-factor`, default 1).
        rope_high_freq_factor: llama3 (`--rope-high-freq-factor`, default 4).
        yarn_beta_fast: yarn (`--yarn-beta-fast`, default 32).
        yarn_beta_slow: yarn (`--yarn-beta-slow`, default 1).
        yarn_mscale: yarn attention-factor numerator scale (`--yarn-mscale`).
        yarn_mscale_all_dim: its denominator scale (`--yarn-mscale-all-dim`).
        yarn_truncate: yarn: floor/ceil the correction range (`--no-yarn-truncate` = HF's
            `truncate: false`).
        rope_attention_factor: explicit attention scaling for yarn / longrope
            (`--rope-attention-factor`); None = derived from the factor.
        longrope_short_factor: longrope per-pair divisors up to the original length
            (`--longrope-short-factor F1 F2 ...`, rotary dim / 2 values).
        longrope_long_factor: longrope per-pair divisors beyond it (`--longrope-long-factor`).
        norm_epsilon: RMSNorm epsilon (`--norm-epsilon`).
        init_method_std: weight init std (`--init-method-std`).
        untie_embeddings_and_output_weights: LLaMA has a separate output layer
            (`--untie-embeddings-and-output-weights`).
        pad_vocab: pad the vocabulary (see `padded_vocab`).
        make_vocab_size_divisible_by: `--make-vocab-size-divisible-by` (Megatron-LM's 128).
        padded_vocab_rows: `--padded-vocab-size`: exactly this many embedding/output rows
            (>= vocab_size); rows from vocab_size up are padding, excluded from the softmax.
    """

    num_layers: int = option(flag=Flag("--num-layers", "transformer layers"))
    hidden_size: int = option(flag=Flag("--hidden-size", "model width"))
    ffn_hidden_size: int = option(flag=Flag(
        "--ffn-hidden-size", "SwiGLU inner width (without a preset: 4 x --hidden-size)"))
    num_attention_heads: int = option(flag=Flag("--num-attention-heads", "query heads"))
    num_query_groups: int | None = option(None, Flag(
        "--num-query-groups", "key/value heads (needs --group-query-attention)"))
    add_qkv_bias: bool = option(False, Flag(
        "--add-qkv-bias", "biases on the Q/K/V projections only (Qwen2)"))
    kv_channels: int | None = option(None, Flag(
        "--kv-channels", "channels per attention head (HF head_dim); default --hidden-size / "
        "--num-attention-heads"))
    vocab_size: int = derived(32000, "--tokenizer-model", "--vocab-size", "--padded-vocab-size",
                              note="the tokenizer's vocabulary, resolved before training")
    max_position_embeddings: int = option(4096, Flag(
        "--max-position-embeddings", "longest sequence the RoPE table covers; raised to "
        "--seq-length when not given"))
    seq_length: int = option(4096, Flag("--seq-length", "training sequence length"))
    rotary_base: int = option(10000, Flag("--rotary-base", "RoPE base theta"))
    rotary_percent: float = option(1.0, Flag("--rotary-percent", "fraction of head dim rotated"))
    rope_scaling: bool = option(False, Flag(
        "--use-rope-scaling", "Megatron-LM's name for --rope-type llama3 (LLaMA-3.1 scaling)"))
    rope_scaling_factor: float | None = option(None, Flag(
        "--rope-scaling-factor", "factor of --rope-type linear/dynamic/yarn/llama3/longrope "
        "(llama3 default: 8)", aliases=("--rope-factor",)))
    seq_len_interpolation_factor: float | None = option(None, Flag(
        "--rotary-seq-len-interpolation-factor", "Megatron-LM's name for --rope-type linear "
        "with this factor (positions / F)"))
    rope_type: str | None = option(None, Flag(
        "--rope-type", "RoPE scheme (HF rope_type); dynamic trains at the base for "
        "--seq-length (default: llama3 / linear with the Megatron flags, else default)",
        choices=ROPE_TYPES))
    rope_original_max_position_embeddings: int | None = option(None, Flag(
        "--rope-original-max-position-embeddings", "pretraining length the scheme extends "
        "(dynamic, yarn, longrope: required; llama3: 8192)"))
    rope_low_freq_factor: float | None = option(None, Flag(
        "--rope-low-freq-factor", "llama3: wavelengths > original / this are divided by the "
        "factor (default 1)"))
    rope_high_freq_factor: float | None = option(None, Flag(
        "--rope-high-freq-factor", "llama3: wavelengths < original / this are kept (default "
        "4)"))
    yarn_beta_fast: float | None = option(None, Flag(
        "--yarn-beta-fast", "yarn: pairs with more rotations over the original length keep "
        "their frequency (default 32)"))
    yarn_beta_slow: float | None = option(None, Flag(
        "--yarn-beta-slow", "yarn: pairs with fewer rotations are interpolated (default 1)"))
    yarn_mscale: float | None = option(None, Flag(
        "--yarn-mscale", "yarn: attention factor numerator scale (with --yarn-mscale-all-dim)"))
    yarn_mscale_all_dim: float | None = option(None, Flag(
        "--yarn-mscale-all-dim", "yarn: attention factor denominator scale"))
    yarn_truncate: bool = option(True, Flag(
        "--no-yarn-truncate", "yarn: do not round the correction range (HF truncate=false)",
        action="store_false"))
    rope_attention_factor: float | None = option(None, Flag(
        "--rope-attention-factor", "yarn/longrope: scale of cos and sin (default: from the "
        "factor)"))
    longrope_short_factor: tuple[float, ...] | None = option(None, Flag(
        "--longrope-short-factor", "longrope: rotary dim / 2 divisors up to the original "
        "length"))
    longrope_long_factor: tuple[float, ...] | None = option(None, Flag(
        "--longrope-long-factor", "longrope: rotary dim / 2 divisors beyond the original "
        "length"))
    norm_epsilon: float = option(1e-5, Flag("--norm-epsilon", "RMSNorm epsilon"))
    init_method_std: float = option(0.02, Flag("--init-method-std", "weight init std"))
    untie_embeddings_and_output_weights: bool = option(True, Flag(
        "--untie-embeddings-and-output-weights",
        "separate output layer (LLaMA); without a preset the default is tied, as Megatron-LM"))
    pad_vocab: bool = derived(False, "--make-vocab-size-divisible-by", "--padded-vocab-size",
                              note="True once the trainer resolved the tokenizer's vocabulary")
    make_vocab_size_divisible_by: int = option(128, Flag(
        "--make-vocab-size-divisible-by", "pad the vocabulary to a multiple of this x TP"))
    padded_vocab_rows: int | None = derived(
        None, "--padded-vocab-size",
        note="exact embedding rows; the rows from vocab_size up are padding, never predicted")

    def padded_vocab(self, tensor_model_parallel_size: int) -> int:
        """Rows of the embedding and output layer at this TP size.

        With `pad_vocab`, Megatron-LM's padding: the vocabulary rounded up to a multiple of
        `make_vocab_size_divisible_by` x TP (LLaMA-2's 32000 -> 32000 at TP1/2, 32768 at TP8;
        LLaMA-3's 128256 -> 129024 at TP8). Padding costs at most divisible_by x TP - 1 rows
        (0.6% of LLaMA-3's table at TP8) and keeps the vocab-parallel GEMMs aligned; the padded
        logits are never targets. `padded_vocab_rows` (--padded-vocab-size) fixes the row count
        at every TP size. Without either, `vocab_size` is the table size itself.
        """
        if self.padded_vocab_rows is not None:
            return self.padded_vocab_rows
        if not self.pad_vocab:
            return self.vocab_size
        return padded_vocab_size(self.vocab_size, tensor_model_parallel_size,
                                 self.make_vocab_size_divisible_by)

    @property
    def query_groups(self) -> int:
        """Key/value heads (num_attention_heads when GQA is off)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Per-head channels (kv_channels; hidden_size / heads unless set)."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Rotated channels per head (megatron: int(head_dim * rotary_percent))."""
        return int(self.head_dim * self.rotary_percent)

    def __post_init__(self) -> None:
        # JSON (longctx_meta.json) gives lists; keep tuples so configs compare and hash alike.
        for name in ("longrope_short_factor", "longrope_long_factor"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(float(v) for v in value))

    def rope_spec(self) -> RopeSpec:
        """The resolved RoPE scheme; ValueError naming the flag on a conflict.

        Megatron's aliases: `--use-rope-scaling` is llama3 (factor default 8, original 8192,
        low/high 1/4), `--rotary-seq-len-interpolation-factor F` is linear with factor F.
        Checkpoints saved before `rope_type` existed hold only those fields and load as such.
        """
        rope_type, factor = self.rope_type, self.rope_scaling_factor
        if self.rope_scaling and self.seq_len_interpolation_factor is not None:
            raise ValueError(
                "--use-rope-scaling and --rotary-seq-len-interpolation-factor are exclusive")
        if self.rope_scaling:
            if rope_type not in (None, "llama3"):
                raise ValueError(f"--use-rope-scaling means --rope-type llama3; it conflicts "
                                 f"with --rope-type {rope_type}")
            rope_type = "llama3"
        if self.seq_len_interpolation_factor is not None:
            if rope_type not in (None, "linear"):
                raise ValueError(f"--rotary-seq-len-interpolation-factor means --rope-type "
                                 f"linear; it conflicts with --rope-type {rope_type}")
            if self.rope_type == "linear" and factor not in (None,
                                                            self.seq_len_interpolation_factor):
                raise ValueError("--rotary-seq-len-interpolation-factor and "
                                 "--rope-scaling-factor disagree; give one")
            rope_type, factor = "linear", self.seq_len_interpolation_factor
        rope_type = rope_type or "default"
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"--rope-type must be one of {ROPE_TYPES}, got {rope_type!r}")
        _check_rope_flags_apply(self, rope_type)
        llama3 = rope_type == "llama3"
        return RopeSpec(
            rope_type=rope_type, theta=float(self.rotary_base),
            factor=8.0 if llama3 and factor is None else factor,
            original_max_position_embeddings=(
                8192 if llama3 and self.rope_original_max_position_embeddings is None
                else self.rope_original_max_position_embeddings),
            max_position_embeddings=self.max_position_embeddings,
            low_freq_factor=_or(self.rope_low_freq_factor, 1.0),
            high_freq_factor=_or(self.rope_high_freq_factor, 4.0),
            beta_fast=_or(self.yarn_beta_fast, 32.0), beta_slow=_or(self.yarn_beta_slow, 1.0),
            mscale=self.yarn_mscale, mscale_all_dim=self.yarn_mscale_all_dim,
            truncate=self.yarn_truncate, attention_factor=self.rope_attention_factor,
            short_factor=self.longrope_short_factor, long_factor=self.longrope_long_factor,
        )

    def validate(self) -> None:
        """Raise ValueError naming the Megatron flag on the first inconsistent field."""
        _check_finite(self)
        for flag, value in (
            ("--num-layers", self.num_layers),
            ("--hidden-size", self.hidden_size),
            ("--ffn-hidden-size", self.ffn_hidden_size),
            ("--num-attention-heads", self.num_attention_heads),
            ("--vocab-size", self.vocab_size),
            ("--seq-length", self.seq_length),
            ("--max-position-embeddings", self.max_position_embeddings),
            ("--rotary-base", self.rotary_base),
            ("--make-vocab-size-divisible-by", self.make_vocab_size_divisible_by),
        ):
            if value <= 0:
                raise ValueError(f"{flag} must be positive, got {value}")
        if self.kv_channels is not None and self.kv_channels <= 0:
            raise ValueError(f"--kv-channels must be positive, got {self.kv_channels}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"--hidden-size ({self.hidden_size}) must be divisible by "
                f"--num-attention-heads ({self.num_attention_heads}) (or set --kv-channels)"
            )
        if self.num_query_groups is not None:
            if self.num_query_groups <= 0:
                raise ValueError(
                    f"--num-query-groups must be positive, got {self.num_query_groups}"
                )
            if self.num_attention_heads % self.num_query_groups:
                raise ValueError(
                    f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
                    f"--num-query-groups ({self.num_query_groups})"
                )
        if self.seq_length > self.max_position_embeddings:
            raise ValueError(
                f"--seq-length ({self.seq_length}) must be <= --max-position-embeddings "
                f"({self.max_position_embeddings})"
            )
        if self.padded_vocab_rows is not None and self.padded_vocab_rows < self.vocab_size:
            raise ValueError(f"--padded-vocab-size ({self.padded_vocab_rows}) must be >= the "
                             f"tokenizer's vocabulary ({self.vocab_size})")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
        validate_rope(self.rope_spec(), self.rotary_dim)


@dataclass
class ParallelConfig:
    """Model-parallel layout; the data-parallel size is whatever the world leaves over.

    Attributes:
        tensor_model_parallel_size: `--tensor-model-parallel-size`.
        pipeline_model_parallel_size: `--pipeline-model-parallel-size`.
        virtual_pipeline_model_parallel_size: model chunks per PP rank (interleaved 1F1B);
            Megatron-LM derives it from `--num-layers-per-virtual-pipeline-stage`.
        context_parallel_size: `--context-parallel-size`; the sequence is split in 2*CP chunks.
        cp_comm_type: `--cp-comm-type` (p2p | a2a | all_gather | a2a+p2p). Only TE's attention
            honours it; the local SDPA attention always all-gathers K/V.
        hierarchical_context_parallel_sizes: `--hierarchical-context-parallel-sizes` (a2a+p2p
            only, required there): the CP group factored as [a2a size, p2p size], e.g. [8, 2]
            for CP16 = a2a inside an 8-GPU node and p2p across 2 nodes. Megatron builds these
            groups only when given the sizes; without them TE would receive `cp_group=None`
            and run attention without context parallelism on a split sequence.
        sequence_parallel: `--sequence-parallel` (needs TP > 1 to do anything).
        overlap_grad_reduce: `--overlap-grad-reduce` / `--no-overlap-grad-reduce`: launch the
            DP gradient all-reduce (reduce-scatter with the distributed optimizer) per bucket
            during the backward pass instead of after it. None = on with CUDA (where the
            communication hides behind compute), off on CPU.
    """

    tensor_model_parallel_size: int = option(1, Flag(
        "--tensor-model-parallel-size", "tensor-parallel ranks (TP)"))
    pipeline_model_parallel_size: int = option(1, Flag(
        "--pipeline-model-parallel-size", "pipeline stages (PP)"))
    virtual_pipeline_model_parallel_size: int | None = derived(
        None, "--num-layers-per-virtual-pipeline-stage",
        note="--num-layers / (PP x layers per virtual stage), as Megatron-LM")
    context_parallel_size: int = option(1, Flag(
        "--context-parallel-size", "context-parallel ranks (CP); the sequence is split in "
        "2 x CP chunks"))
    cp_comm_type: str = option("p2p", Flag(
        "--cp-comm-type", "CP communication (TE attention only; the local spec all-gathers "
        "K/V): p2p | a2a | all_gather | a2a+p2p"))
    hierarchical_context_parallel_sizes: tuple[int, ...] | None = option(None, Flag(
        "--hierarchical-context-parallel-sizes", "with --cp-comm-type a2a+p2p: a2a and p2p "
        "group sizes (product = CP)"))
    sequence_parallel: bool = option(False, Flag(
        "--sequence-parallel", "shard norms/dropout activations over TP (needs TP > 1)"))
    overlap_grad_reduce: bool | None = option(None, Flag(
        "--overlap-grad-reduce", "overlap the DP gradient reduction with the backward pass "
        "(default: on with CUDA, off on CPU)", negative="--no-overlap-grad-reduce"))

    @property
    def model_parallel_size(self) -> int:
        """TP * PP * CP: ranks one model replica spans."""
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    def validate(self, world_size: int | None = None) -> None:
        """Check sizes; with `world_size`, also that the world divides into replicas."""
        for flag, value in (
            ("--tensor-model-parallel-size", self.tensor_model_parallel_size),
            ("--pipeline-model-parallel-size", self.pipeline_model_parallel_size),
            ("--context-parallel-size", self.context_parallel_size),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            if vpp < 1:
                raise ValueError(f"virtual pipeline size must be >= 1, got {vpp}")
            if vpp > 1 and self.pipeline_model_parallel_size < 2:
                raise ValueError(
                    "--num-layers-per-virtual-pipeline-stage needs "
                    "--pipeline-model-parallel-size > 1"
                )
        if self.cp_comm_type not in CP_COMM_TYPES:
            raise ValueError(f"--cp-comm-type must be one of {CP_COMM_TYPES}, got "
                             f"{self.cp_comm_type!r}")
        hcp = self.hierarchical_context_parallel_sizes
        if self.cp_comm_type == "a2a+p2p":
            if not hcp:
                raise ValueError(
                    "--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes "
                    "(e.g. 8 2: a2a within 8 ranks, p2p across 2), whose product is "
                    "--context-parallel-size")
        elif hcp:
            raise ValueError("--hierarchical-context-parallel-sizes is only used with "
                             "--cp-comm-type a2a+p2p")
        if hcp:
            product = 1
            for size in hcp:
                product *= size
            if len(hcp) != 2 or min(hcp) < 1 or product != self.context_parallel_size:
                raise ValueError(
                    f"--hierarchical-context-parallel-sizes {' '.join(map(str, hcp))} must be "
                    "two sizes (a2a, p2p) whose product is --context-parallel-size "
                    f"({self.context_parallel_size})")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if world_size is not None and world_size % self.model_parallel_size:
            raise ValueError(
                f"world size ({world_size}) must be divisible by --tensor-model-parallel-size "
                f"({self.tensor_model_parallel_size}) x --pipeline-model-parallel-size "
                f"({self.pipeline_model_parallel_size}) x --context-parallel-size "
                f"({self.context_parallel_size}) = {self.model_parallel_size}"
            )


@dataclass
class PrecisionConfig:
    """Numerics and kernel implementation.

    FP8 needs Transformer Engine (its linear layers hold the scaling state); the local spec has
    no FP8 path, so FP8 without TE is rejected rather than silently run in BF16.

    Attributes:
        params_dtype: fp32 | bf16 | fp16 (`--bf16`, `--fp16`). On CPU use fp32: this CPU has no
            bf16 units and fp32 is 4-7x faster there.
        transformer_impl: local | transformer_engine (`--transformer-impl`).
        fp8: None | e4m3 | hybrid (`--fp8-format`); hybrid = E4M3 forward, E5M2 gradients.
        fp8_recipe: delayed | tensorwise | mxfp8 | blockwise (`--fp8-recipe`).
        fp8_amax_history_len: `--fp8-amax-history-len` (delayed scaling window).
        fp8_amax_compute_algo: max | most_recent (`--fp8-amax-compute-algo`).
        fp8_dot_product_attention: FP8 attention in TE's cuDNN backend (no upstream CLI flag;
            ours is `--fp8-dot-product-attention`). Attention is ~72% of the FLOPs of
            LLaMA-2 7B at 128K, so this is where FP8 pays most, and where accuracy risk is.
            TE's fused FP8 attention on sm90 trains with head dim 128 (LLaMA's); other head
            dims fall back or fail inside TE.
        apply_rope_fusion: TE's fused RoPE kernel (`--no-rope-fusion` turns it off). None =
            on when CUDA and Transformer Engine are present (megatron's fused RoPE is TE's
            kernel; without TE TransformerConfig refuses it), off otherwise.
        gradient_accumulation_fusion: accumulate weight gradients into the fp32 `main_grad`
            inside the GEMM (`--no-gradient-accumulation-fusion` turns it off). None = on with
            CUDA when apex's `fused_weight_gradient_mlp_cuda` exists, for either spec (the
            output layer is megatron's local ColumnParallelLinear, which needs it even when
            TE's linear layers fuse their own), off otherwise.
        cross_entropy_impl: chunked (default; model/loss.py: fused with the output GEMM,
            chunked over tokens, never [tokens, V] logits, padded vocabulary rows excluded so
            the loss does not depend on TP) | megatron (the stock path, kept for comparison:
            at 32K tokens x 128,256 rows one fp32 logits copy alone is 16.8 GB).
        cross_entropy_chunk_size: tokens per chunk of the chunked loss; its fp32 chunk is
            chunk x padded vocab / TP x 4 bytes (1024 x 128,256: 0.5 GB at TP1, 0.26 GB at
            TP2), independent of the sequence length. 1024 rather than 2048-4096: at 32K
            tokens of a tiny model the chunk is the largest item left in the step (2048: 1.05
            GB of ~2.7 GB), while GEMMs with M = 1024 rows stay efficient on CPU and GPU.
    """

    params_dtype: str = derived("fp32", "--bf16", "--fp16", note="fp32 unless --bf16/--fp16")
    transformer_impl: str | None = option("local", Flag(
        "--transformer-impl", "transformer_engine | local (default: TE when importable)",
        cli_default=None))
    fp8: Literal["e4m3", "hybrid"] | None = option(None, Flag(
        "--fp8-format", "FP8 training (needs Transformer Engine); hybrid = E4M3 forward, "
        "E5M2 gradients"))
    fp8_recipe: str = option("delayed", Flag(
        "--fp8-recipe", "FP8 scaling: delayed | tensorwise | mxfp8 | blockwise"))
    fp8_amax_history_len: int = option(1, Flag(
        "--fp8-amax-history-len", "delayed scaling window"))
    fp8_amax_compute_algo: str = option("most_recent", Flag(
        "--fp8-amax-compute-algo", "amax from the window: max | most_recent"))
    fp8_dot_product_attention: bool = option(False, Flag(
        "--fp8-dot-product-attention", "FP8 attention in TE's cuDNN backend (head dim 128)"))
    apply_rope_fusion: bool | None = option(None, Flag(
        "--no-rope-fusion", "unfused RoPE (fused is the default with CUDA + TE)",
        action="store_false"))
    gradient_accumulation_fusion: bool | None = option(None, Flag(
        "--no-gradient-accumulation-fusion", "unfused weight-gradient accumulation (fused is "
        "the default with CUDA where the kernel exists)", action="store_false"))
    cross_entropy_impl: Literal["chunked", "megatron"] = option("chunked", Flag(
        "--cross-entropy-impl", "output-layer loss: chunked (fused with the output GEMM, "
        "chunked over tokens, padded vocabulary rows excluded) | megatron (stock "
        "vocab_parallel_cross_entropy on full logits; includes padded rows)"))
    cross_entropy_chunk_size: int = option(1024, Flag(
        "--cross-entropy-chunk-size", "tokens per chunk of the chunked loss (fp32 chunk: "
        "tokens x padded vocab / TP x 4 bytes, 0.5 GB at 1024 x 128,256)"))

    def implementation(self, te_available: bool) -> str:
        """`transformer_impl`, with None (the CLI's auto) resolved: TE when importable."""
        if self.transformer_impl is not None:
            return self.transformer_impl
        return "transformer_engine" if te_available else "local"

    def validate(self, te_available: bool) -> None:
        """Check choices; `te_available` is whether transformer_engine imports (it also
        resolves an auto `transformer_impl`)."""
        if self.params_dtype not in PARAMS_DTYPES:
            raise ValueError(f"params dtype must be one of {PARAMS_DTYPES} (--bf16/--fp16), "
                             f"got {self.params_dtype!r}")
        impl = self.implementation(te_available)
        if impl not in TRANSFORMER_IMPLS:
            raise ValueError(f"--transformer-impl must be one of {TRANSFORMER_IMPLS}, got "
                             f"{impl!r}")
        if self.fp8 is not None:
            if self.fp8 not in FP8_FORMATS:
                raise ValueError(f"--fp8-format must be one of {FP8_FORMATS}, got {self.fp8!r}")
            if impl != "transformer_engine" or not te_available:
                raise ValueError(
                    f"--fp8-format {self.fp8} needs --transformer-impl transformer_engine with "
                    "Transformer Engine installed; the local implementation has no FP8 kernels"
                )
            if self.fp8_recipe not in FP8_RECIPES:
                raise ValueError(f"--fp8-recipe must be one of {FP8_RECIPES}, got "
                                 f"{self.fp8_recipe!r}")
            if self.fp8_amax_history_len < 1:
                raise ValueError(f"--fp8-amax-history-len must be >= 1, got "
                                 f"{self.fp8_amax_history_len}")
            if self.fp8_amax_compute_algo not in FP8_AMAX_ALGOS:
                raise ValueError(f"--fp8-amax-compute-algo must be one of {FP8_AMAX_ALGOS}, "
                                 f"got {self.fp8_amax_compute_algo!r}")
        elif self.fp8_dot_product_attention:
            raise ValueError("--fp8-dot-product-attention needs --fp8-format")
        if impl == "transformer_engine" and not te_available:
            raise ValueError(
                "--transformer-impl transformer_engine needs Transformer Engine installed "
                "(use --transformer-impl local on machines without it)"
            )
        if self.cross_entropy_impl not in CROSS_ENTROPY_IMPLS:
            raise ValueError(f"--cross-entropy-impl must be one of {CROSS_ENTROPY_IMPLS}, got "
                             f"{self.cross_entropy_impl!r}")
        if self.cross_entropy_chunk_size < 1:
            raise ValueError(f"--cross-entropy-chunk-size must be >= 1, got "
                             f"{self.cross_entropy_chunk_size}")
        if self.apply_rope_fusion and not te_available:
            raise ValueError("RoPE fusion needs Transformer Engine (pass --no-rope-fusion)")
        if self.fp8 is not None and self.params_dtype == "fp32":
            raise ValueError(f"--fp8-format {self.fp8} expects --bf16 or --fp16 (params dtype "
                             "fp32 given)")


def validate_all(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig | None = None,
    *,
    te_available: bool = False,
    world_size: int | None = None,
) -> None:
    """Validate each config, then the constraints that couple them.

    Order of checks follows Megatron-LM's `validate_args`: each config alone, then heads and
    groups against TP, then layers against PP*VPP, then sequence against TP (SP) and 2*CP.
    """
    model.validate()
    parallel.validate(world_size)
    if precision is not None:
        precision.validate(te_available)
    tp = parallel.tensor_model_parallel_size
    if model.num_attention_heads % tp:
        raise ValueError(
            f"--num-attention-heads ({model.num_attention_heads}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )
    if model.query_groups % tp:
        raise ValueError(
            f"--num-query-groups ({model.query_groups}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )
    if model.ffn_hidden_size % tp:
        raise ValueError(
            f"--ffn-hidden-size ({model.ffn_hidden_size}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )
    stages = parallel.pipeline_model_parallel_size * (
        parallel.virtual_pipeline_model_parallel_size or 1
    )
    if model.num_layers % stages:
        raise ValueError(
            f"--num-layers ({model.num_layers}) must be divisible by "
            f"--pipeline-model-parallel-size ({parallel.pipeline_model_parallel_size}) x "
            f"virtual stages ({parallel.virtual_pipeline_model_parallel_size or 1})"
        )
    cp = parallel.context_parallel_size
    if precision is not None and precision.implementation(te_available) == "transformer_engine":
        if cp > 1 and parallel.cp_comm_type == "all_gather" and \
                precision.fp8_dot_product_attention:
            # TE 2.7 runs the all-gather CP attention in BF16 whatever the FP8 request.
            raise ValueError("--fp8-dot-product-attention does not run in FP8 with "
                             "--cp-comm-type all_gather (TE computes it in BF16); use p2p, a2a "
                             "or a2a+p2p")
        if precision.fp8_dot_product_attention and model.head_dim != 128:
            raise ValueError(
                f"--fp8-dot-product-attention needs head dim 128 (--hidden-size / "
                f"--num-attention-heads = {model.head_dim}): TE's fused FP8 attention trains "
                "only with LLaMA's head dim on sm90")
    divisor = 2 * cp if cp > 1 else 1
    if parallel.sequence_parallel:
        divisor *= tp
    if model.seq_length % divisor:
        raise ValueError(
            f"--seq-length ({model.seq_length}) must be divisible by "
            + (f"2 x --context-parallel-size ({cp})" if cp > 1 else "1")
            + (f" x --tensor-model-parallel-size ({tp}) with --sequence-parallel"
               if parallel.sequence_parallel else "")
            + f" = {divisor}"
        )
