"""One optimizer step (and one evaluation step) on megatron-core's pipeline schedules.

Loss normalisation: every micro-batch's loss func returns (sum of per-token losses over
unmasked tokens, number of unmasked tokens, logging sums). With `calculate_per_token_loss`
megatron sums gradients over micro-batches and DP x CP ranks, then divides them once by the
all-reduced token count (finalize_model_grads). The logged `lm loss` is the same ratio: sum of
losses / sum of tokens over the whole global batch, so it equals a single process running the
global batch, whatever TP/PP/CP/DP and accumulation, and a CP rank whose tokens are all masked
contributes 0 / 0 instead of NaN.

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
    grad_norm: float | None = None
    skipped: bool = False
    nan: bool = False


def _loss_func(loss_mask: torch.Tensor, dataset_id: torch.Tensor | None, num_domains: int,
               output_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    losses = output_tensor.float()
    mask = loss_mask.to(losses.dtype)
    token_losses = losses * mask
    loss_sum = token_losses.sum()
    count = mask.sum()
    domain = torch.zeros(num_domains, 2, dtype=torch.float64)
    if dataset_id is not None and num_domains > 1:
        per_sample = token_losses.detach().sum(dim=1).double()
        per_count = mask.sum(dim=1).double()
        ids = dataset_id.to(torch.long).cpu()
        domain[:, 0].index_add_(0, ids, per_sample.cpu())
        domain[:, 1].index_add_(0, ids, per_count.cpu())
    report = {"lm loss": torch.stack([loss_sum.detach().double().cpu(), count.double().cpu()]),
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


def reduce_losses(reports: list[dict], num_domains: int) -> tuple[float, int, torch.Tensor]:
    """(loss, tokens, per-domain sums) of the global batch, identical on every rank."""
    from megatron.core import parallel_state as ps

    totals = torch.zeros(2 + 2 * num_domains, dtype=torch.float64)
    for report in reports or []:
        totals[:2] += report["lm loss"]
        totals[2:] += report["domain"].flatten()
    totals = totals.to(comm_device())  # NCCL reduces CUDA tensors only
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(totals, src=last, group=ps.get_pipeline_model_parallel_group())
    totals = totals.cpu()
    loss_sum, count = float(totals[0]), int(totals[1])
    loss = loss_sum / count if count else float("nan")
    return loss, count, totals[2:].view(num_domains, 2)


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
    loss, tokens, domains = reduce_losses(reports, max(len(domain_names), 1))
    result = StepResult(loss=loss, tokens=tokens,
                        domain_losses=_domain_dict(domains, domain_names))
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
    loss, tokens, domains = reduce_losses(reports, max(len(domain_names), 1))
    return StepResult(loss=loss, tokens=tokens, domain_losses=_domain_dict(domains, domain_names))
