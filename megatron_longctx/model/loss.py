"""Chunked, vocab-parallel cross-entropy fused with the output projection.

megatron-core 0.16.1's loss path (`GPTModel._postprocess`) runs the output layer over the
whole micro-batch and then `vocab_parallel_cross_entropy` on fp32 logits: it keeps
[tokens, V/TP] logits in the compute dtype and an fp32 copy that becomes the softmax and then
the gradient in place (in bf16 runs also the gradient's bf16 cast). At 32K tokens and LLaMA-3's
128,256 rows one fp32 copy is 16.8 GB (measured here: 16.9 GB peak RSS for one tiny-model step
on CPU, 1.7 GB with this module). This module computes the same loss and the same gradients
chunk by chunk over tokens:

* forward, per chunk of `chunk_tokens` rows: logits = hidden_chunk @ W_shard^T (compute dtype,
  fp32 accumulation inside the GEMM, upcast to fp32 as megatron does), padded vocabulary rows
  set to -inf, max all-reduced over TP, exp-sum and the target logit all-reduced over TP (one
  collective for both), loss = log(sum) - (target - max).
* gradient, per chunk, while the chunk's softmax is at hand: softmax - one_hot(target), times
  the token's weight, then grad_hidden_chunk = g @ W and grad_W += g^T @ hidden_chunk (an
  fp32-output GEMM: the chunk's product is never rounded to bf16; see `_add_weight_grad`).
  Only when a backward can follow (not under `torch.no_grad()`: evaluation does one GEMM per
  chunk) and not in fp16, where the unscaled gradient would underflow: there backward forms
  it from the loss-scaled incoming gradient, as the stock path does. The trainer passes its
  loss mask (training/step.py), and its loss func makes the incoming gradient exactly
  c x mask, so backward only scales by c: the output layer costs 3 GEMMs, as in the stock
  path. Without a mask, or when the losses are used otherwise, the
  backward recomputes each chunk's logits from the saved per-token max and sum (8 bytes per
  token) instead: one more GEMM, +33% of the output layer's FLOPs.

Peak memory of the loss is then chunk_tokens x V/TP x 6 bytes in bf16 runs (the fp32 chunk
plus its bf16 GEMM output or bf16 gradient; 4 bytes in fp32 runs; on CPU, which has no
fp32-output bf16 GEMM, the upcast operands add 4 bytes more), plus an fp32 [V/TP, h]
weight gradient and grad_hidden [tokens, h] held from the forward to the backward (see
`_ChunkedCrossEntropy`). Default chunk 1024 tokens: 0.5 GB fp32 per chunk at V=128,256 and
TP1, independent of the sequence length (measured: benchmarks/bench_long_context.py,
docs/long-context.md; on an H100 at 128K: docs/slurm.md).

Exactness: the per-chunk arithmetic is megatron's (`tensor_parallel.cross_entropy`) op for op,
so losses equal the stock path's on an unpadded vocabulary to fp32 rounding (identical in the
tests and benchmark here); gradients differ only by the order of the weight-gradient sum over
chunks (<= 1e-6 relative; tests/unit/test_loss.py, tests/distributed/test_loss_parallel.py).
Padded rows (`ModelConfig.padded_vocab`: the tokenizer's vocabulary rounded up to 128 x TP)
are excluded exactly, so the loss no longer depends on TP; the stock
path included them (a converted checkpoint's zero rows give logit 0: 1.6e-2 between TP1 and
TP2 with an 8,000-token tokenizer, 0.139 with the 600-token one of the tests).

Parallelism: TP as megatron's ColumnParallelLinear does it, reusing its autograd mappings
(copy-to-TP-region: all-reduce of grad_hidden; with sequence parallelism the hidden states are
all-gathered and their gradient reduce-scattered); CP needs nothing (each rank's tokens are
independent rows); with PP only the last stage computes the loss, as before. Tied embeddings:
the weight is `shared_embedding_or_output_weight()`, as in the stock path, and gets its
gradient through autograd (megatron then all-reduces it between first and last stage).
Per-token loss normalisation, per-domain loss, --eod-mask-loss and document masking act on
the returned [b, s] per-token losses in training/step.py, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

#: Tokens per chunk by default (see the module docstring for the memory arithmetic).
DEFAULT_CHUNK_TOKENS = 1024


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, valid_rows: int) -> torch.Tensor:
    """fp32 logits of one chunk, padded rows at -inf (a fresh tensor the caller may modify)."""
    logits = torch.matmul(hidden, weight.t())
    logits = logits.float() if logits.dtype != torch.float32 else logits
    if valid_rows < logits.shape[1]:
        logits[:, valid_rows:] = float("-inf")
    return logits


def _local_targets(target: torch.Tensor, vocab_start: int,
                   valid_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into this shard, whether the target lives in this shard) per token."""
    local = target - vocab_start
    in_shard = (local >= 0) & (local < valid_rows)
    return torch.where(in_shard, local, torch.zeros_like(local)), in_shard


def _all_reduce(tensor: torch.Tensor, op: Any, group: Any) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def _softmax_grad_(probs: torch.Tensor, target: torch.Tensor, vocab_start: int,
                   valid_rows: int, scale: torch.Tensor) -> torch.Tensor:
    """In place: softmax -> (softmax - one_hot(target)) * scale per token (megatron's
    order of operations); returns it."""
    local, in_shard = _local_targets(target, vocab_start, valid_rows)
    rows = torch.arange(probs.shape[0], device=probs.device)
    probs[rows, local] -= in_shard.float()
    return probs.mul_(scale.unsqueeze(-1))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """hidden [N, h], weight [V/TP, h], target [N] -> per-token loss [N] (fp32).

    With `token_weights` (the loss mask) and `eager` (the caller's answer to "can a backward
    follow, outside fp16": under torch.no_grad `ctx.needs_input_grad` still reads true, and
    grad mode is always off inside forward), each chunk's gradient is formed in the forward
    pass while its softmax is at hand, weighted by the mask: grad_hidden [N, h]
    and an fp32 grad_W are kept instead of recomputing every chunk's logits in backward (on
    this CPU that recompute made the step 1.26x slower than the stock path at 4K tokens). Cost:
    grad_hidden (tokens x h in the compute dtype) and grad_W (V/TP x h x 4 B: 1.05 GB for
    LLaMA-3 8B at TP2) live from this loss's forward to its backward, which directly follows
    it on the last stage without virtual PP (1F1B); with interleaved virtual stages several
    micro-batches can be in flight there, each holding its own pair.
    megatron's loss func makes the incoming gradient exactly c x mask for one scalar c (loss
    sum over masked tokens, times the loss scale); backward checks that and scales by c, and
    otherwise (any other use of the per-token losses) falls back to the recompute.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                token_weights: torch.Tensor | None, vocab_start: int, valid_rows: int,
                chunk: int, group: Any, accumulate_main_grad: bool,
                eager: bool) -> torch.Tensor:
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        maxes, sums = torch.empty_like(loss), torch.empty_like(loss)
        # (`ctx.needs_input_grad` is true under torch.no_grad() too, and grad mode is always
        # off inside forward: the caller decides.)
        eager = eager and token_weights is not None
        grad_hidden = torch.empty_like(hidden) if eager else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if eager else None)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = _chunk_logits(hidden[start:end], weight, valid_rows)
            logits_max = logits.max(dim=-1)[0]
            _all_reduce(logits_max, dist.ReduceOp.MAX, group)
            logits.sub_(logits_max.unsqueeze(-1))
            local, in_shard = _local_targets(target[start:end], vocab_start, valid_rows)
            predicted = logits.gather(1, local.unsqueeze(-1)).squeeze(-1)
            predicted = torch.where(in_shard, predicted, torch.zeros_like(predicted))
            torch.exp(logits, out=logits)
            pair = torch.stack([logits.sum(dim=-1), predicted])
            _all_reduce(pair, dist.ReduceOp.SUM, group)
            loss[start:end] = torch.log(pair[0]) - pair[1]
            maxes[start:end], sums[start:end] = logits_max, pair[0]
            if eager:
                logits.div_(pair[0].unsqueeze(-1))
                _softmax_grad_(logits, target[start:end], vocab_start, valid_rows,
                               token_weights[start:end].float())
                _chunk_backward(logits, weight, hidden[start:end], grad_hidden[start:end],
                                grad_weight)
            del logits
        ctx.save_for_backward(hidden, weight, target, maxes, sums, token_weights, grad_hidden,
                              grad_weight)
        ctx.args = (vocab_start, valid_rows, chunk, accumulate_main_grad)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        (hidden, weight, target, maxes, sums, token_weights, grad_hidden,
         grad_weight) = ctx.saved_tensors
        vocab_start, valid_rows, chunk, accumulate_main_grad = ctx.args
        grad_loss = grad_loss.float()
        into_main = accumulate_main_grad and hasattr(weight, "main_grad")
        scale = (None if grad_hidden is None
                 else _uniform_scale(grad_loss, token_weights.float()))
        if scale is not None:
            grad_hidden = grad_hidden.mul_(scale) if scale != 1.0 else grad_hidden
            if into_main:
                weight.main_grad.add_(grad_weight, alpha=scale)
            else:
                grad_weight.mul_(scale)
        else:
            grad_hidden = torch.empty_like(hidden)
            grad_weight = (weight.main_grad if into_main else
                           torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
            for start in range(0, hidden.shape[0], chunk):
                end = min(start + chunk, hidden.shape[0])
                probs = _chunk_logits(hidden[start:end], weight, valid_rows)
                probs.sub_(maxes[start:end].unsqueeze(-1))
                torch.exp(probs, out=probs)
                probs.div_(sums[start:end].unsqueeze(-1))
                _softmax_grad_(probs, target[start:end], vocab_start, valid_rows,
                               grad_loss[start:end])
                _chunk_backward(probs, weight, hidden[start:end], grad_hidden[start:end],
                                grad_weight)
        return (grad_hidden, _weight_grad_result(weight, grad_weight, into_main, hidden.dtype),
                None, None, None, None, None, None, None, None)


def _uniform_scale(grad_loss: torch.Tensor, token_weights: torch.Tensor) -> float | None:
    """c when grad_loss == c x token_weights exactly (megatron's masked loss sum), else None."""
    nonzero = torch.nonzero(token_weights)
    if nonzero.numel() == 0:
        return 0.0 if not grad_loss.any() else None
    first = int(nonzero[0, 0])
    scale = float(grad_loss[first] / token_weights[first])
    return scale if torch.equal(grad_loss, token_weights * scale) else None


def _chunk_backward(grad_logits: torch.Tensor, weight: torch.Tensor, hidden: torch.Tensor,
                    grad_hidden_out: torch.Tensor, grad_weight: torch.Tensor) -> None:
    """grad_hidden_out = g @ W and grad_weight += g^T @ hidden for one chunk (g in the
    compute dtype, as megatron's output-layer backward gets it)."""
    grad_logits = grad_logits.to(weight.dtype)
    torch.matmul(grad_logits, weight, out=grad_hidden_out)
    _add_weight_grad(grad_weight, grad_logits, hidden)


#: How a bf16/fp16 GEMM adds into an fp32 accumulator on each device type, found once by
#: `_fp32_accumulation`: "addmm" (one fp32-output GEMM with beta=1 into the accumulator),
#: "mm" (fp32-output GEMM, then add) or "upcast" (fp32 GEMM on upcast operands).
_FP32_ACCUMULATION: dict[str, str] = {}


def _fp32_accumulation(device: torch.device, dtype: torch.dtype) -> str:
    """The cheapest exact way to add a `dtype` GEMM into an fp32 tensor on `device`.

    torch's `out_dtype` GEMMs (CUDA, torch >= 2.8) accumulate bf16/fp16 products in fp32 and
    write fp32, as megatron's `wgrad_gemm_accum_fp32` does into main_grad; early versions
    refuse an fp32 `self` in addmm (then: an fp32 [V/TP, h] temporary per chunk), CPU has
    neither (then: operands upcast per chunk, the chunk's fp32 copy). Probed on 2x2 tensors,
    so a refusal is a dtype check, never a failure halfway through a real GEMM.
    """
    key = f"{device.type}:{dtype}"
    if key not in _FP32_ACCUMULATION:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        acc = torch.ones(2, 2, dtype=torch.float32, device=device)
        mode = "upcast"
        try:
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            mode = "addmm" if bool((acc == 3).all()) else "upcast"
        except (RuntimeError, TypeError, NotImplementedError):
            try:
                torch.mm(a, a, out_dtype=torch.float32)
                mode = "mm"
            except (RuntimeError, TypeError, NotImplementedError):
                pass
        _FP32_ACCUMULATION[key] = mode
    return _FP32_ACCUMULATION[key]


def _add_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor,
                     hidden: torch.Tensor) -> None:
    """grad_weight (fp32 accumulator or main_grad) += grad_logits^T @ hidden, accumulated in
    fp32: the chunk's product is never rounded to the compute dtype (bf16 rounding 32 chunks
    at 128K/CP4 before adding them was up to several bf16 ulps off megatron's single fp32 GEMM;
    tests/unit/test_loss.py)."""
    if grad_logits.dtype == grad_weight.dtype:
        grad_weight.addmm_(grad_logits.t(), hidden)
        return
    mode = _fp32_accumulation(grad_weight.device, grad_logits.dtype)
    if mode == "addmm":
        torch.addmm(grad_weight, grad_logits.t(), hidden, out_dtype=torch.float32,
                    out=grad_weight)
    elif mode == "mm":
        grad_weight.add_(torch.mm(grad_logits.t(), hidden, out_dtype=torch.float32))
    else:
        grad_weight.addmm_(grad_logits.t().float(), hidden.float())


def _weight_grad_result(weight: torch.Tensor, grad_weight: torch.Tensor, into_main: bool,
                        dtype: torch.dtype) -> torch.Tensor | None:
    """What autograd gets for the weight: the gradient itself, or (accumulated straight into
    megatron DDP's main_grad, as ColumnParallelLinear's fused path does) a placeholder that
    DDP's hook skips because `grad_added_to_main_grad` is set."""
    if not into_main:
        return grad_weight.to(weight.dtype)
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros(weight.main_grad.shape, dtype=dtype, device=weight.device)
    return torch.empty(weight.main_grad.shape, dtype=dtype, device=weight.device)


def vocab_parallel_chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    sequence_parallel: bool = False,
    tp_group: Any = None,
    accumulate_main_grad: bool = False,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy of the output projection, never holding [tokens, V] logits.

    Args:
        hidden: final-norm output [s, b, h] ([s/TP, b, h] with sequence parallelism).
        weight: this TP rank's output-layer rows [V_padded/TP, h] (rank r holds rows
            r * V_padded/TP onwards, as megatron's VocabUtility splits them).
        labels: target token ids [b, s].
        vocab_size: the unpadded vocabulary; rows at or above it are excluded exactly.
        chunk_tokens: tokens per chunk (memory: chunk_tokens x V/TP x 4 bytes per chunk).
        sequence_parallel: hidden is sequence-sharded over TP (all-gathered here, its
            gradient reduce-scattered).
        tp_group: the tensor-parallel group (None: no TP).
        accumulate_main_grad: add the weight gradient straight into `weight.main_grad`
            (megatron DDP's fp32 buffer) when the weight has one, as gradient-accumulation
            fusion does; otherwise the gradient is returned through autograd.
        loss_mask: [b, s] weights the caller will multiply the losses by (the trainer's loss
            mask). Given, with grad mode on and outside fp16, the gradient is formed in the
            forward pass (no logits recompute); it stays exact for any other use of the
            losses (backward then recomputes).

    Returns:
        fp32 per-token losses [b, s], as megatron's compute_language_model_loss returns them.
    """
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    if tp > 1:
        if sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, True, group=tp_group)
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b, h = hidden.shape
    rank = dist.get_rank(tp_group) if tp > 1 else 0
    rows = weight.shape[0]
    vocab_start = rank * rows
    valid_rows = max(0, min(rows, vocab_size - vocab_start))
    target = labels.transpose(0, 1).reshape(-1)
    weights = None if loss_mask is None else loss_mask.transpose(0, 1).reshape(-1)
    # Gradients in the forward pass only when a backward can follow (not under no_grad:
    # evaluation would pay two GEMMs per chunk and an fp32 [V/TP, h] buffer for nothing),
    # and not in fp16, where the unscaled gradient would underflow before the loss scale
    # reaches it: backward then forms it from the scaled incoming gradient, as the stock
    # path does (one more GEMM per chunk, fp16 runs only).
    eager = (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
             and hidden.dtype != torch.float16)
    loss = _ChunkedCrossEntropy.apply(hidden.reshape(s * b, h), weight, target, weights,
                                      vocab_start, valid_rows, chunk_tokens,
                                      tp_group if tp > 1 else None, accumulate_main_grad,
                                      eager)
    return loss.view(s, b).transpose(0, 1).contiguous()


class ChunkedLossGPTModel(GPTModel):
    """megatron's GPTModel whose training loss (labels given) is the chunked cross-entropy.

    Every other path is the parent's, unchanged: without labels (evaluation backends, logits),
    multi-token prediction, inference contexts, non-last pipeline stages. Same parameters and
    state-dict keys as GPTModel, so checkpoints are interchangeable with the stock path.
    """

    def __init__(self, *args: Any, unpadded_vocab_size: int,
                 cross_entropy_chunk_size: int = DEFAULT_CHUNK_TOKENS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unpadded_vocab_size = unpadded_vocab_size
        self.cross_entropy_chunk_size = cross_entropy_chunk_size

    def _postprocess(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        labels = kwargs.get("labels")
        if (args or labels is None or not self.post_process or kwargs.get("mtp_in_postprocess")
                or self.config.mtp_num_layers is not None
                or kwargs.get("inference_context") is not None):
            return super()._postprocess(hidden_states, *args, **kwargs)
        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else self.output_layer.weight)
        return vocab_parallel_chunked_cross_entropy(
            hidden_states, weight, labels,
            vocab_size=self.unpadded_vocab_size,
            chunk_tokens=self.cross_entropy_chunk_size,
            sequence_parallel=self.config.sequence_parallel,
            tp_group=self.pg_collection.tp,
            accumulate_main_grad=bool(self.config.gradient_accumulation_fusion),
            loss_mask=kwargs.get("loss_mask"),
        )
