"""Training metrics: FLOPs per token, MFU, throughput, memory, TensorBoard and the console line.

Everything here is pure bookkeeping (no collectives): the trainer measures the iteration time
and the reduced losses, then hands them to these helpers on every rank; only the logging rank
writes.

TensorBoard tags follow Megatron-LM's `training_log` so curves from stock Megatron-LM and from
this trainer overlay in one TensorBoard:

===============================  =============================================================
tag                              value
===============================  =============================================================
``lm loss``                      token-mean training loss over the global batch
``lm loss/{domain}``             the same restricted to one domain's tokens (e.g.
                                 ``lm loss/RedPajamaBook``); TensorBoard groups them by prefix
``learning-rate``                learning rate after the step
``grad-norm``                    global gradient L2 norm before clipping
``loss-scale``                   dynamic loss scale (fp16 only; skipped when None)
``iteration-time``               seconds per iteration (Megatron logs seconds)
``tokens-per-second``            global tokens/s (global batch x seq length / iteration time)
``tokens-per-second-per-device`` tokens/s divided by the world size: the number comparable
                                 across papers and launch layouts
``tflops-per-device``            achieved model TFLOP/s per device (`flops_per_token`)
``mfu``                          tflops-per-device / the device's dense bf16/fp16 peak, a fraction
                                 (0.28 = 28%); FP8 runs too (see `peak_tflops`)
``tflops-per-device/document-masked``  with --reset-attention-mask: the same, attention counted
                                 per document (`document_masked_flops`: sum of squared document
                                 lengths, what the masked kernels compute) instead of s^2
``mfu/document-masked``          MFU from that count
``thd-pad-fraction``             with --reset-attention-mask: pad slots / row slots so far (THD
                                 packing pads each document to 2 x CP)
``thd-dropped-fraction``         real tokens cut from the rows' ends / row slots so far
``mem-max-allocated-gb``         torch.cuda.max_memory_allocated, GiB
``mem-max-reserved-gb``          torch.cuda.max_memory_reserved, GiB
``mem-max-rss-gb``               host peak resident set size, GiB (the CPU runs' memory)
===============================  =============================================================

Optional series (each behind its Megatron-LM flag; Megatron-LM's tags):

==================================  ==========================================================
tag                                 value (flag)
==================================  ==========================================================
``throughput``                      achieved TFLOP/s per device (``--log-throughput``)
``mem-allocated-bytes``             torch.cuda.memory_allocated (``--log-memory-to-tensorboard``)
``mem-reserved-bytes``              torch.cuda.memory_reserved (same flag; CUDA only)
``mem-max-allocated-bytes``         torch.cuda.max_memory_allocated (same flag; CUDA only)
``mem-allocated-count``             live allocations of the caching allocator (CUDA only)
``mem-rss-bytes``                   host resident set size now (same flag; every device)
``mem-max-rss-bytes``               host peak resident set size (same flag; every device)
``forward-backward-time``           seconds in the pipeline schedule (``--log-timers-to-
                                    tensorboard``; also the next three)
``optimizer-time``                  seconds in optimizer.step (clip, update, param copy)
``batch-generator-time``            seconds reading and preparing the step's micro-batches
``save-checkpoint-time``            seconds training was blocked by a save (at its iteration;
                                    with --async-save the scheduling only)
``params-norm``                     L2 norm of all parameters (``--log-params-norm``)
``num-zeros``                       zero gradient elements (``--log-num-zeros-in-grad``)
``lm loss validation``              validation loss (with --eval-interval)
``lm loss validation ppl``          exp(validation loss), capped at exp(20) as Megatron-LM
==================================  ==========================================================

With ``--wandb-project`` every value written to TensorBoard is also logged to W&B, same tag,
same step.

The console line (`format_console_line`) reads the same dict keyed by these tags plus four
console-only keys (``consumed-samples``, ``global-batch-size``, ``skipped-iterations``,
``nan-iterations``), so a trainer builds one dict per logged iteration and passes it to both.

Writing happens on the last rank, as in Megatron-LM: with pipeline parallelism only the last
stage holds the loss, and the last global rank is always a last stage.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Mapping
from typing import Any

from megatron_longctx.config.model import ModelConfig

# --- TensorBoard tags (Megatron-LM names) ----------------------------------------------------
TAG_LM_LOSS = "lm loss"
TAG_LEARNING_RATE = "learning-rate"
TAG_GRAD_NORM = "grad-norm"
TAG_LOSS_SCALE = "loss-scale"
TAG_ITERATION_TIME = "iteration-time"
TAG_TOKENS_PER_SECOND = "tokens-per-second"
TAG_TOKENS_PER_SECOND_PER_DEVICE = "tokens-per-second-per-device"
TAG_TFLOPS_PER_DEVICE = "tflops-per-device"
TAG_MFU = "mfu"
#: With document masking the attention FLOPs follow the documents, and the tags say so.
TAG_TFLOPS_DOCUMENT_MASKED = "tflops-per-device/document-masked"
TAG_MFU_DOCUMENT_MASKED = "mfu/document-masked"
TAG_MEM_MAX_ALLOCATED = "mem-max-allocated-gb"
TAG_MEM_MAX_RESERVED = "mem-max-reserved-gb"
TAG_MEM_MAX_RSS = "mem-max-rss-gb"
# Optional series (Megatron-LM's tags; see the module docstring).
TAG_THROUGHPUT = "throughput"
TAG_PARAMS_NORM = "params-norm"
TAG_NUM_ZEROS = "num-zeros"
TAG_VALID_LOSS = "lm loss validation"
TAG_VALID_PPL = "lm loss validation ppl"
TIMER_TAGS = {name: f"{name}-time" for name in
              ("forward-backward", "optimizer", "batch-generator", "save-checkpoint")}
# Console-only keys of the values dict (not written to TensorBoard by the trainer).
KEY_CONSUMED_SAMPLES = "consumed-samples"
KEY_GLOBAL_BATCH_SIZE = "global-batch-size"
KEY_SKIPPED_ITERATIONS = "skipped-iterations"
KEY_NAN_ITERATIONS = "nan-iterations"

# `ThroughputMeter.update` keys -> TensorBoard tags.
THROUGHPUT_TAGS = {
    "tokens_per_s": TAG_TOKENS_PER_SECOND,
    "tokens_per_s_per_device": TAG_TOKENS_PER_SECOND_PER_DEVICE,
    "tflops_per_device": TAG_TFLOPS_PER_DEVICE,
    "mfu": TAG_MFU,
}
# `memory_stats` keys -> TensorBoard tags.
MEMORY_TAGS = {
    "max_allocated_gb": TAG_MEM_MAX_ALLOCATED,
    "max_reserved_gb": TAG_MEM_MAX_RESERVED,
    "max_rss_gb": TAG_MEM_MAX_RSS,
}

_GIB = float(1 << 30)


def domain_loss_tag(domain: str) -> str:
    """TensorBoard tag of one domain's loss: ``lm loss/{domain}``."""
    return f"{TAG_LM_LOSS}/{domain}"


# --- FLOPs -----------------------------------------------------------------------------------
def matmul_params(model_cfg: ModelConfig) -> int:
    """N_matmul: weights that take part in a matmul for every token.

    Per layer: Q (h x h), K and V (h x groups*head_dim each, so GQA shrinks them), the attention
    output projection (h x h) and SwiGLU's gate, up and down matrices (3 x h x ffn); plus the
    output (logit) layer h x vocab. The input embedding is a lookup, not a matmul, and RMSNorm
    weights are elementwise, so neither counts. The logit layer is a matmul whether or not it
    shares its weight with the embedding, so `untie_embeddings_and_output_weights` does not
    change N_matmul (it only changes the parameter count).

    LLaMA-2 7B: 32 x (67.1M + 135.3M) + 131.1M = 6.607B (of 6.74B parameters).
    LLaMA-3 8B: 32 x (41.9M + 176.2M) + 525.3M = 7.505B (of 8.03B; GQA 8 groups).
    """
    h = model_cfg.hidden_size
    q_dim = model_cfg.num_attention_heads * model_cfg.head_dim
    kv_dim = model_cfg.query_groups * model_cfg.head_dim
    attention = h * q_dim + 2 * h * kv_dim + q_dim * h
    mlp = 3 * h * model_cfg.ffn_hidden_size
    return model_cfg.num_layers * (attention + mlp) + h * model_cfg.vocab_size


def attention_flops_per_token(
    model_cfg: ModelConfig, seq_length: int | None = None, *, causal: bool = True
) -> float:
    """Training FLOPs per token of the two s x s attention matmuls (QK^T and PV).

    Forward, per layer and per query token, against k keys: QK^T costs 2*k*d and PV another
    2*k*d (a multiply-add = 2 FLOPs; d = heads x head_dim = hidden size; GQA does not reduce it,
    every query head still meets every key). Backward costs twice the forward (gradients with
    respect to both operands of each matmul), so training = 3 x forward = 12*k*d per layer.
    Non-causal: k = s, giving 12*L*d*s. Causal: token i sees i+1 keys, on average (s+1)/2, and
    the standard count (Megatron-LM, NeMo, PaLM appendix B) rounds it to s/2, giving 6*L*d*s; the
    rounding is 1/s relative (8e-6 at 128K). See `flops_per_token`.
    """
    s = model_cfg.seq_length if seq_length is None else seq_length
    d = model_cfg.num_attention_heads * model_cfg.head_dim
    per_layer = 12.0 * d * s if not causal else 6.0 * d * s
    return model_cfg.num_layers * per_layer


def flops_per_token(
    model_cfg: ModelConfig, seq_length: int | None = None, *, causal: bool = True
) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) of the LLaMA architecture.

    FLOPs/token = 6 * N_matmul + 6 * L * d * s      (causal attention)
                = 6 * N_matmul + 12 * L * d * s     (counted non-causal, as NeMo reports)

    Derivation: each weight of a matmul costs one multiply-add = 2 FLOPs per token forward, and
    backward needs two such products (gradient w.r.t. the input and w.r.t. the weight), so
    training costs 3 x 2 = 6 FLOPs per weight per token (`matmul_params` counts the weights:
    Q/K/V with GQA, output projection, SwiGLU's 3 matrices, the logit layer). Attention's QK^T and
    PV are 2 matmuls of s x s x d per sequence: 4*s*d FLOPs per token per layer forward, x3 for
    training = 12*L*d*s; under a causal mask a token meets s/2 keys on average, so 6*L*d*s
    (`attention_flops_per_token`). Elementwise work (RMSNorm, RoPE, SwiGLU's product, softmax,
    the loss) is left out, as in Megatron-LM's and PaLM's MFU counts: it is < 1% here.

    LLaMA-2 7B at s = 131072 (L=32, d=4096, ffn 11008, vocab 32000):
    N_matmul = 6.607B, 6*N = 39.6 GFLOP; 6*L*d*s = 103.1 GFLOP; total 142.7 GFLOP/token with
    attention 72.2% of it (causal). Counted non-causal: 245.8 GFLOP/token (attention 83.9%).
    At 4K context the same model needs 42.9 GFLOP/token (attention 7.5%): a 128K token costs 3.3x
    a 4K token. NeMo's 555 TFLOPS/GPU for this model at 128K is the non-causal count: it is
    2,260 tokens/s/GPU x 245.8 GFLOP; by the causal count the same run does 323 TFLOP/s.

    Args:
        model_cfg: the model shape (its `vocab_size` as used; pass the padded vocabulary when the
            builder pads it).
        seq_length: training sequence length; None uses `model_cfg.seq_length`.
        causal: count the causal mask's half of the attention matmuls (True, what runs) or the
            full s x s (False, comparable with NeMo's published TFLOPS).

    Returns:
        FLOPs per trained token.
    """
    return 6.0 * matmul_params(model_cfg) + attention_flops_per_token(
        model_cfg, seq_length, causal=causal
    )


def document_masked_flops(model_cfg: ModelConfig, tokens: int, square_tokens: float) -> float:
    """Training FLOPs of an iteration whose attention is masked per document.

    6 * N_matmul per token as in `flops_per_token`; attention per causal document of n tokens
    is 6 * L * d * n^2 (n tokens x 6*L*d*n each, the causal count), so the iteration's
    attention is 6 * L * d * sum(n^2) over its documents. Example (LLaMA-2 7B, one 128K row):
    one document gives 6*L*d*s per token, the full causal count; 400 documents of ~328 tokens
    give 1/400 of that attention, so the MFU of a masked run counted by s^2 would be 3.5x too
    high (72% of the FLOPs are attention at 128K).

    Args:
        tokens: tokens of the iteration (global batch x seq length).
        square_tokens: sum over the iteration's documents of (padded length)^2.
    """
    d = model_cfg.num_attention_heads * model_cfg.head_dim
    return 6.0 * matmul_params(model_cfg) * tokens + 6.0 * model_cfg.num_layers * d * square_tokens


# --- device peak and throughput --------------------------------------------------------------
# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, TFLOP/s: (bf16/fp16, fp8).
# Checked in order: the first substring found in the lower-cased device name wins.
_PEAKS: tuple[tuple[str, float, float | None], ...] = (
    ("h200", 989.0, 1979.0),  # same compute as H100 SXM (more, faster HBM3e); also GH200
    ("h100 pcie", 756.0, 1513.0),
    ("h100 nvl", 835.0, 1671.0),
    ("h100", 989.0, 1979.0),  # SXM: torch reports e.g. "NVIDIA H100 80GB HBM3"
    ("a100", 312.0, None),  # Ampere: no FP8 tensor cores
)


def peak_tflops(
    device_name: str | None,
    dtype: str,
    fp8: bool,
    *,
    override: float | None = None,
) -> float | None:
    """Dense peak TFLOP/s of one device for the training precision, or None when unknown.

    Args:
        device_name: `torch.cuda.get_device_name()`, e.g. "NVIDIA H100 80GB HBM3"; None or a
            name containing "cpu" means no accelerator.
        dtype: params dtype, "bf16" | "fp16" | "fp32". fp32 (TF32 or not) has no entry: MFU is
            only reported for the precisions we train in.
        fp8: return the FP8 peak (2x the BF16 one on Hopper). MFU is reported against the
            bf16 peak for FP8 runs too (the trainer passes False), the figure Megatron-LM,
            NeMo and papers quote; against the FP8 peak it would read half as high. A figure
            against the FP8 peak must be labelled as such (e.g. `mfu_vs_fp8_peak`).
        override: an explicit peak (the trainer's `--peak-tflops`), returned as is; use it for
            devices not in the table or clock-limited parts (e.g. 500 W H100s).

    Returns:
        TFLOP/s, or None (MFU is then reported as None, never guessed).
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"--peak-tflops must be positive, got {override}")
        return float(override)
    if device_name is None:
        return None
    name = device_name.lower()
    if "cpu" in name or dtype not in ("bf16", "fp16"):
        return None
    for key, half, eight in _PEAKS:
        if key in name:
            return eight if fp8 else half
    return None


class ThroughputMeter:
    """Tokens/s, TFLOP/s per device and MFU from the measured iteration time.

    Every device is credited with an equal share of the global work: TP, PP and CP split one
    model replica's FLOPs across devices without changing their total, so
    tflops_per_device = tokens_per_s x flops_per_token / world_size / 1e12, and
    MFU = tflops_per_device / peak_tflops.

    Args:
        tokens_per_iteration: global tokens per iteration (global batch size x seq length).
        world_size: all ranks (devices) of the job.
        flops_per_token: from `flops_per_token` (choose causal or not once, and say which).
        peak_tflops: per-device peak (`peak_tflops`); None leaves MFU None.
    """

    def __init__(
        self,
        tokens_per_iteration: int,
        world_size: int,
        flops_per_token: float,
        peak_tflops: float | None = None,
    ) -> None:
        if tokens_per_iteration <= 0 or world_size <= 0 or flops_per_token <= 0:
            raise ValueError(
                "tokens_per_iteration, world_size and flops_per_token must be positive, got "
                f"{tokens_per_iteration}, {world_size}, {flops_per_token}"
            )
        if peak_tflops is not None and peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be positive, got {peak_tflops}")
        self.tokens_per_iteration = tokens_per_iteration
        self.world_size = world_size
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops

    def update(self, iteration_time_s: float,
               flops_per_iteration: float | None = None) -> dict[str, float | None]:
        """Rates for one iteration (or a mean iteration time over a logging interval).

        `flops_per_iteration` replaces tokens x flops_per_token when the work depends on the
        batch (document masking: `document_masked_flops`).

        Returns:
            ``tokens_per_s`` (global), ``tokens_per_s_per_device``, ``tflops_per_device`` and
            ``mfu`` (a fraction, None when the peak is unknown). `THROUGHPUT_TAGS` maps the keys
            to TensorBoard tags.
        """
        if not iteration_time_s > 0:
            raise ValueError(f"iteration time must be positive, got {iteration_time_s}")
        tokens_per_s = self.tokens_per_iteration / iteration_time_s
        per_device = tokens_per_s / self.world_size
        if flops_per_iteration is None:
            tflops = per_device * self.flops_per_token / 1e12
        else:
            tflops = flops_per_iteration / iteration_time_s / self.world_size / 1e12
        mfu = None if self.peak_tflops is None else tflops / self.peak_tflops
        return {
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": per_device,
            "tflops_per_device": tflops,
            "mfu": mfu,
        }


# --- memory ----------------------------------------------------------------------------------
def memory_stats() -> dict[str, float]:
    """Peak memory of this process in GiB (2**30 bytes).

    Always ``max_rss_gb``: the host peak resident set size (`resource.getrusage`; ru_maxrss is
    KiB on Linux, bytes on macOS), which is the memory figure of a CPU run. With CUDA also
    ``max_allocated_gb`` and ``max_reserved_gb`` for the current device (the caching allocator's
    peaks since start or the last `torch.cuda.reset_peak_memory_stats`). `MEMORY_TAGS` maps the
    keys to TensorBoard tags.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    stats = {"max_rss_gb": rss_bytes / _GIB}
    torch = sys.modules.get("torch")  # never import torch (and CUDA) just to read memory
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        stats["max_allocated_gb"] = torch.cuda.max_memory_allocated() / _GIB
        stats["max_reserved_gb"] = torch.cuda.max_memory_reserved() / _GIB
    return stats


def memory_series() -> dict[str, float]:
    """`--log-memory-to-tensorboard`'s values, in bytes (Megatron-LM's tags): the host RSS now
    and at its peak on every device, and with CUDA the caching allocator's allocated,
    reserved, peak-allocated bytes and allocation count."""
    import psutil

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    series = {"mem-rss-bytes": float(psutil.Process().memory_info().rss),
              "mem-max-rss-bytes": float(rss if sys.platform == "darwin" else rss * 1024)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        stats = torch.cuda.memory_stats()
        series.update({
            "mem-allocated-bytes": float(stats.get("allocated_bytes.all.current", 0)),
            "mem-reserved-bytes": float(stats.get("reserved_bytes.all.current", 0)),
            "mem-max-allocated-bytes": float(stats.get("allocated_bytes.all.peak", 0)),
            "mem-allocated-count": float(stats.get("allocation.all.current", 0)),
        })
    return series


def validation_ppl(loss: float) -> float:
    """Perplexity of a validation loss as Megatron-LM logs it: exp(min(20, loss))."""
    return math.exp(min(20.0, loss))


# --- TensorBoard ------------------------------------------------------------------------------
class MetricsWriter:
    """TensorBoard (and W&B) scalars on the logging rank; a no-op everywhere else.

    The SummaryWriter is created (and torch.utils.tensorboard imported) only when
    `is_logging_rank` is True and `log_dir` is given (`--tensorboard-dir`); otherwise every method
    does nothing, so callers never branch on rank.

    Args:
        log_dir: TensorBoard directory, or None to disable.
        is_logging_rank: True on the rank that writes (the last rank, as in Megatron-LM).
        queue_size: events buffered before a write (`--tensorboard-queue-size`, default 1000).
        wandb_run: a W&B run (`training/observability.init_wandb`) that receives the same
            scalars at the same steps; finished by `close`.
    """

    def __init__(self, log_dir: str | None, is_logging_rank: bool, *, queue_size: int = 1000,
                 wandb_run: Any | None = None):
        self._writer = None
        self._wandb = wandb_run if is_logging_rank else None
        if is_logging_rank and log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=log_dir, max_queue=queue_size)

    @property
    def enabled(self) -> bool:
        """Whether this rank writes events (TensorBoard or W&B)."""
        return self._writer is not None or self._wandb is not None

    def add_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """One scalar per tag at `step`; None values are skipped, tensors converted with float().

        NaN and inf are written as they are: a diverging loss should show in the curve.
        """
        if not self.enabled:
            return
        scalars = {tag: float(value) for tag, value in values.items() if value is not None}
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, global_step=step)
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)

    def flush(self) -> None:
        """Write buffered events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close (the W&B run is finished); later calls are no-ops."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- console ----------------------------------------------------------------------------------
def format_console_line(iteration: int, train_iters: int, values: Mapping[str, Any]) -> str:
    """A Megatron-LM style log line from the tag-keyed values dict; None values are left out.

    Example::

         iteration       10/     100 | consumed samples: 80 | elapsed time per iteration (ms):
         123.4 | learning rate: 2.000E-05 | global batch size: 8 | lm loss: 5.123456E+00 |
         domain losses: arxiv 5.0123, book 4.9876 | grad norm: 1.234 | tokens/s: 1234 |
         TFLOP/s/device: 1.2 | MFU: 12.3% | number of skipped iterations: 0 |
         number of nan iterations: 0 |

    (one line). Reads the tags of the module docstring plus the console-only keys; per-domain
    losses (``lm loss/{domain}``) are gathered into one compact field; unknown keys are ignored.
    """
    get = values.get
    fields: list[str] = [f" iteration {iteration:8d}/{train_iters:8d}"]
    if (v := get(KEY_CONSUMED_SAMPLES)) is not None:
        fields.append(f"consumed samples: {int(v)}")
    if (v := get(TAG_ITERATION_TIME)) is not None:
        fields.append(f"elapsed time per iteration (ms): {float(v) * 1000:.1f}")
    if (v := get(TAG_LEARNING_RATE)) is not None:
        fields.append(f"learning rate: {float(v):.3E}")
    if (v := get(KEY_GLOBAL_BATCH_SIZE)) is not None:
        fields.append(f"global batch size: {int(v)}")
    if (v := get(TAG_LM_LOSS)) is not None:
        fields.append(f"lm loss: {float(v):.6E}")
    prefix = TAG_LM_LOSS + "/"
    domains = [
        f"{key[len(prefix):]} {float(v):.4f}"
        for key, v in values.items()
        if key.startswith(prefix) and v is not None
    ]
    if domains:
        fields.append("domain losses: " + ", ".join(domains))
    if (v := get(TAG_LOSS_SCALE)) is not None:
        fields.append(f"loss scale: {float(v):.1f}")
    if (v := get(TAG_GRAD_NORM)) is not None:
        fields.append(f"grad norm: {float(v):.3f}")
    if (v := get(TAG_TOKENS_PER_SECOND)) is not None:
        fields.append(f"tokens/s: {float(v):.0f}")
    if (v := get(TAG_TOKENS_PER_SECOND_PER_DEVICE)) is not None:
        fields.append(f"tokens/s/device: {float(v):.0f}")
    if (v := get(TAG_TFLOPS_PER_DEVICE)) is not None:
        fields.append(f"TFLOP/s/device: {float(v):.1f}")
    if (v := get(TAG_MFU)) is not None:
        fields.append(f"MFU: {float(v) * 100:.1f}%")
    if (v := get(TAG_TFLOPS_DOCUMENT_MASKED)) is not None:
        fields.append(f"TFLOP/s/device (document-masked attention): {float(v):.1f}")
    if (v := get(TAG_MFU_DOCUMENT_MASKED)) is not None:
        fields.append(f"MFU (document-masked attention): {float(v) * 100:.1f}%")
    if (v := get(TAG_MEM_MAX_ALLOCATED)) is not None:
        fields.append(f"mem max allocated (GiB): {float(v):.2f}")
    if (v := get(KEY_SKIPPED_ITERATIONS)) is not None:
        fields.append(f"number of skipped iterations: {int(v)}")
    if (v := get(KEY_NAN_ITERATIONS)) is not None:
        fields.append(f"number of nan iterations: {int(v)}")
    return " | ".join(fields) + " |"
