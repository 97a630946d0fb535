"""One optimizer step (and one evaluation step) on megatron-core's pipeline schedules.

Loss normalisation: every micro-batch's loss func returns (sum of per-token losses over
unmasked tokens, number of unmasked tokens, logging sums), all on the device: nothing is copied
to the host until `reduce_losses` sums the step's reports, reduces them in one collective and
reads them once (Megatron-LM likewise syncs only when it logs). With
`--calculate-per-token-loss` (the default) megatron sums gradients over micro-batches and
DP x CP ranks, then divides them once by the all-reduced token count (finalize_model_grads), so
the gradient equals a single process running the global batch, whatever TP/PP/CP/DP and
accumulation, and a CP rank whose tokens are all masked contributes 0 / 0 instead of NaN.
`--no-calculate-per-token-loss` is Megatron-LM's default: each micro-batch's mean, averaged over
micro-batches and DP ranks (which depends on the layout when micro-batches hold different
numbers of loss tokens). The logged `lm loss` is the per-token ratio in both modes: sum of
losses / sum of tokens over the global batch, as Megatron-LM logs it.

Per-domain loss: with a blended dataset each sample carries `dataset_id`; the loss func adds
per-domain (sum, count) pairs, reduced like the total.

Non-finite loss: the reduced loss is known to every rank (all-reduced over DP x CP on the last
pipeline stage, then broadcast over the pipeline), so all ranks take the same decision: skip
the update (`--on-nan-loss skip`) or stop (`stop`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist


class NonFiniteLossError(RuntimeError):
    """Raised when the loss is NaN/Inf and --on-nan-loss is stop."""


@dataclass
class StepResult:
    """What one step produced (identical on every rank)."""

    loss: float
    tokens: int
    domain_losses: dict[str, float] = field(default_factory=dict)
    document_square_tokens: float | None = None  # sum of squared document lengths, or None
    grad_norm: float | None = None
    skipped: bool = False
    nan: bool = False


def _loss_func(loss_mask: torch.Tensor, dataset_id: torch.Tensor | None, num_domains: int,
               output_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(sum of unmasked token losses, their count, logging sums): everything stays on the
    model's device (no host sync per micro-batch); `reduce_losses` moves the step's totals to
    the host once."""
    losses = output_tensor.float()
    mask = loss_mask.to(losses.dtype)
    token_losses = losses * mask
    loss_sum = token_losses.sum()
    count = mask.sum()
    domain = torch.zeros(num_domains, 2, dtype=torch.float64, device=losses.device)
    if dataset_id is not None and num_domains > 1:
        # A THD micro-batch is one packed row holding the b samples one after another, each
        # seq / CP tokens on every rank: [1, b * s] -> [b, s].
        rows = int(dataset_id.numel())
        per_sample = token_losses.detach().reshape(rows, -1).sum(dim=1).double()
        per_count = mask.reshape(rows, -1).sum(dim=1).double()
        ids = dataset_id.to(device=losses.device, dtype=torch.long)
        domain[:, 0].index_add_(0, ids, per_sample)
        domain[:, 1].index_add_(0, ids, per_count)
    report = {"lm loss": torch.stack([loss_sum.detach().double(), count.double()]),
              "domain": domain}
    return loss_sum, count.to(torch.int), report


def make_forward_step(num_domains: int) -> Any:
    """The forward_step_func megatron's schedules call: (data iterator, model) -> (out, loss)."""

    def forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        # loss_mask: the chunked loss (model/loss.py) forms its gradient in the forward pass,
        # weighted by the mask that _loss_func applies; megatron's stock path ignores it.
        output = model(
            batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
            packed_seq_params=batch.get("packed_seq_params"), loss_mask=batch["loss_mask"],
        )
        return output, partial(_loss_func, batch["loss_mask"], batch.get("dataset_id"),
                               num_domains)

    return forward_step


def comm_device() -> torch.device:
    """Where small control tensors must live for collectives: CUDA under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_losses(reports: list[dict], num_domains: int,
                  extra: torch.Tensor | None = None) -> tuple[float, int, torch.Tensor,
                                                              torch.Tensor | None]:
    """(loss, tokens, per-domain sums, extra sums) of the global batch, identical on every
    rank: the micro-batch reports are summed on the device, reduced in one collective, and
    copied to the host once per step.

    Args:
        extra: per-rank float64 values summed over DP x CP with the losses (on the last
            pipeline stage, then broadcast), e.g. the attention work of the step's batches.
    """
    from megatron.core import parallel_state as ps

    device = comm_device()  # NCCL reduces CUDA tensors only
    n_extra = 0 if extra is None else int(extra.numel())
    totals = torch.zeros(2 + 2 * num_domains + n_extra, dtype=torch.float64, device=device)
    if reports:
        totals[:2] += torch.stack([r["lm loss"].to(device) for r in reports]).sum(dim=0)
        totals[2:2 + 2 * num_domains] += torch.stack(
            [r["domain"].to(device).flatten() for r in reports]).sum(dim=0)
    if extra is not None:
        totals[2 + 2 * num_domains:] += extra.to(device=device, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(totals, src=last, group=ps.get_pipeline_model_parallel_group())
    totals = totals.cpu()
    loss_sum, count = float(totals[0]), int(totals[1])
    loss = loss_sum / count if count else float("nan")
    domains = totals[2:2 + 2 * num_domains].view(num_domains, 2)
    return loss, count, domains, (totals[2 + 2 * num_domains:] if n_extra else None)


def document_square_sum(microbatches: list[dict]) -> torch.Tensor | None:
    """This rank's share of the sum over documents of (padded length)^2 in its THD
    micro-batches, from the host-side `thd_stats` of training/data.py (no device sync). Divided
    by CP: every CP rank holds the same cu_seqlens and the sum runs over DP x CP. None without
    document masking. The attention work of a causal document of n tokens is proportional to
    n^2 (metrics.document_masked_flops)."""
    from megatron.core import parallel_state as ps

    stats = [b["thd_stats"] for b in microbatches if b.get("thd_stats") is not None]
    total = sum(s["square_tokens"] for s in stats)
    if not stats:
        return None
    return torch.tensor([total / ps.get_context_parallel_world_size()], dtype=torch.float64)


def _domain_dict(sums: torch.Tensor, names: list[str]) -> dict[str, float]:
    return {name: float(sums[i, 0] / sums[i, 1]) for i, name in enumerate(names)
            if len(names) > 1 and sums[i, 1] > 0}


def _run_schedule(model_chunks: list[Any], microbatches: list[dict], *, seq_length: int,
                  micro_batch_size: int, forward_only: bool, num_domains: int) -> list[dict]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(microbatches) for _ in model_chunks]
    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=make_forward_step(num_domains),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def train_step(model_chunks: list[Any], optimizer: Any, scheduler: Any,
               microbatches: list[dict], *, seq_length: int, micro_batch_size: int,
               global_batch_size: int, domain_names: list[str],
               on_nan_loss: str = "stop") -> StepResult:
    """Forward/backward over the step's micro-batches, then the optimizer and LR updates.

    Args:
        microbatches: this rank's prepared micro-batches (prepare_microbatch output).
        seq_length: the global sequence length (megatron divides by CP/TP for p2p shapes).
    """
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = _run_schedule(model_chunks, microbatches, seq_length=seq_length,
                            micro_batch_size=micro_batch_size, forward_only=False,
                            num_domains=max(len(domain_names), 1))
    loss, tokens, domains, extra = reduce_losses(reports, max(len(domain_names), 1),
                                                 document_square_sum(microbatches))
    result = StepResult(loss=loss, tokens=tokens,
                        domain_losses=_domain_dict(domains, domain_names),
                        document_square_tokens=None if extra is None else float(extra[0]))
    if not math.isfinite(loss):
        result.nan = True
        if on_nan_loss == "stop":
            raise NonFiniteLossError(f"loss is {loss} (--on-nan-loss stop)")
        result.skipped = True
        return result
    update_ok, grad_norm, _ = optimizer.step()
    result.grad_norm = None if grad_norm is None else float(grad_norm)
    if update_ok:
        scheduler.step(increment=global_batch_size)
    else:
        result.skipped = True
    return result


@torch.no_grad()
def eval_step(model_chunks: list[Any], microbatches: list[dict], *, seq_length: int,
              micro_batch_size: int, domain_names: list[str]) -> StepResult:
    """Forward-only loss over the micro-batches (no gradient, no update)."""
    for chunk in model_chunks:
        chunk.eval()
    try:
        reports = _run_schedule(model_chunks, microbatches, seq_length=seq_length,
                                micro_batch_size=micro_batch_size, forward_only=True,
                                num_domains=max(len(domain_names), 1))
    finally:
        for chunk in model_chunks:
            chunk.train()
    loss, tokens, domains, _ = reduce_losses(reports, max(len(domain_names), 1))
    return StepResult(loss=loss, tokens=tokens, domain_losses=_domain_dict(domains, domain_names))
