"""Context-parallel batch split in Megatron's load-balanced layout.

A [b, s] tensor is viewed as [b, 2*cp, s/(2*cp)] and CP rank r keeps chunks r and 2*cp-1-r
(megatron's get_batch_on_this_cp_rank). With a causal mask, chunk i costs work proportional to
i + 1/2, so pairing an early with a late chunk gives every rank the same work: at CP=4 the
naive contiguous split would give the last rank 7/16 of the attention FLOPs and the first 1/16,
the paired split gives each 4/16. Megatron's RoPE (get_pos_emb_on_this_cp_rank) and our SDPA
core attention both assume exactly this layout.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_cp_seq_length(seq_length: int, cp_size: int) -> None:
    """Raise ValueError unless seq_length splits into 2*cp equal chunks."""
    if cp_size < 1:
        raise ValueError(f"--context-parallel-size must be >= 1, got {cp_size}")
    if cp_size > 1 and seq_length % (2 * cp_size):
        raise ValueError(
            f"--seq-length ({seq_length}) must be divisible by 2 x --context-parallel-size "
            f"({cp_size}) = {2 * cp_size} for the load-balanced context-parallel split"
        )


def cp_chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two chunk indices (of 2*cp) that CP rank `cp_rank` keeps, in local order."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} outside context-parallel size {cp_size}")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def cp_token_positions(
    seq_length: int, cp_size: int, cp_rank: int, device: torch.device | str | None = None
) -> Tensor:
    """Global positions (int64, [s/cp]) of the tokens CP rank `cp_rank` keeps, in local order.

    Use them for RoPE and for masks built on the local tokens (e.g. document ids).
    """
    check_cp_seq_length(seq_length, cp_size)
    if cp_size == 1:
        return torch.arange(seq_length, device=device)
    chunk = seq_length // (2 * cp_size)
    first, second = cp_chunk_ids(cp_size, cp_rank)
    return torch.cat([
        torch.arange(first * chunk, (first + 1) * chunk, device=device),
        torch.arange(second * chunk, (second + 1) * chunk, device=device),
    ])


def split_for_cp(tensor: Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1) -> Tensor:
    """Keep chunks r and 2*cp-1-r of `tensor` along `seq_dim` (a view-then-select copy)."""
    if cp_size == 1:
        return tensor
    seq = tensor.shape[seq_dim]
    check_cp_seq_length(seq, cp_size)
    idx = torch.tensor(cp_chunk_ids(cp_size, cp_rank), device=tensor.device)
    view = tensor.view(*tensor.shape[:seq_dim], 2 * cp_size, seq // (2 * cp_size),
                       *tensor.shape[seq_dim + 1:])
    kept = view.index_select(seq_dim, idx)
    return kept.reshape(*tensor.shape[:seq_dim], -1, *tensor.shape[seq_dim + 1:])


def split_batch_for_cp(
    batch: dict[str, Tensor | None], cp_size: int, cp_rank: int
) -> dict[str, Tensor | None]:
    """This CP rank's part of a batch of [b, s] tensors (Megatron's load-balanced layout).

    Tensors are split along dim 1 (the sequence), except a 4-D `attention_mask` [b, 1, s, s],
    which is split along its query dim 2 as Megatron does (keys stay global). None values and
    0-/1-D tensors pass through. If the batch has no `position_ids`, they are added: the global
    positions of the kept tokens, [b, s/cp].

    Raises:
        ValueError: when seq is not divisible by 2*cp (names --seq-length and
            --context-parallel-size).
    """
    seq_lengths = {v.shape[1] for k, v in batch.items()
                   if isinstance(v, Tensor) and v.dim() >= 2 and k != "attention_mask"}
    if len(seq_lengths) > 1:
        raise ValueError(f"batch tensors disagree on sequence length: {sorted(seq_lengths)}")
    out: dict[str, Tensor | None] = {}
    for key, value in batch.items():
        if not isinstance(value, Tensor) or value.dim() < 2:
            out[key] = value
        elif key == "attention_mask" and value.dim() == 4:
            out[key] = split_for_cp(value, cp_size, cp_rank, seq_dim=2)
        else:
            out[key] = split_for_cp(value, cp_size, cp_rank, seq_dim=1)
    if "position_ids" not in batch and seq_lengths:
        (seq,) = seq_lengths
        ref = next(v for v in batch.values() if isinstance(v, Tensor) and v.dim() >= 2)
        pos = cp_token_positions(seq, cp_size, cp_rank, device=ref.device)
        out["position_ids"] = pos.unsqueeze(0).expand(ref.shape[0], -1)
    return out
