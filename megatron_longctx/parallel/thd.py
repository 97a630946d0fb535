"""Packed documents in THD layout (one row of concatenated documents) split for context
parallelism the way Transformer Engine splits them.

Transformer Engine's attention for `qkv_format="thd"` takes the packed micro-batch as one row
of tokens [t, heads, dim] with cumulative document offsets (`cu_seqlens`, int32, offsets of the
whole row before the CP split; TE divides them by CP itself). Under context parallelism TE
expects every CP rank to hold, of EVERY document, chunks r and 2*CP-1-r of 2*CP equal chunks
(its `thd_get_partitioned_indices` rule): the causal load balance of Megatron's sequence split,
applied per document. That requires every (padded) document length to be a multiple of 2*CP;
a length that is not is silently rounded by TE (TransformerEngine#1930), so lengths are padded
here and the pads are masked from the loss.

Our choices, each against a known trap:

* cu_seqlens = cu_seqlens_padded: a pad then sits inside its document (after its last real
  token, so causal attention never lets a real token see it) instead of in a gap TE treats
  specially; TE <= 2.17.1 takes a wrong fast path for padded tails under p2p
  (TransformerEngine#3331; Megatron-LM's workaround is the same).
* The packed row stays exactly `--seq-length` long: padding grows the documents, so the tail
  of the last one is cut. Pipeline p2p shapes and sequence-parallel divisibility stay fixed.
  Cost on the demo corpus is in docs/long-context.md (pads + dropped tokens ~1% at CP4).
* The split is our own implementation of the rule, checked against a brute-force oracle in
  tests/unit/test_thd.py; the CPU twin (model/attention.py) consumes exactly this layout.

Functions are pure torch/numpy on CPU; the batch builder lives in training/data.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor


def thd_pad_multiple(cp_size: int) -> int:
    """Every document's padded length must be a multiple of this: 2*CP, or 1 without CP."""
    return 2 * cp_size if cp_size > 1 else 1


def thd_partition_indices(cu_seqlens_padded: Tensor | np.ndarray | list[int], cp_size: int,
                          cp_rank: int) -> Tensor:
    """Positions in the packed row (int64) that CP rank `cp_rank` holds, in its local order.

    For each document d (padded bounds [s_d, e_d), length a multiple of 2*CP, chunk
    c_d = (e_d - s_d) / (2*CP)) the rank holds [s_d + r c_d, s_d + (r+1) c_d) followed by
    [s_d + (2CP-1-r) c_d, s_d + (2CP-r) c_d), documents in order.

    Raises:
        ValueError: a padded length not divisible by 2*CP, or a rank out of range.
    """
    cu = torch.as_tensor(np.asarray(cu_seqlens_padded, dtype=np.int64))
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} outside context-parallel size {cp_size}")
    lengths = cu[1:] - cu[:-1]
    if cp_size == 1:
        return torch.arange(int(cu[-1]) - int(cu[0]), dtype=torch.int64) + cu[0]
    parts = 2 * cp_size
    if bool((lengths % parts).any()):
        bad = int(lengths[(lengths % parts) != 0][0])
        raise ValueError(f"padded document length {bad} is not a multiple of 2 x CP = {parts}")
    chunk = lengths // parts
    starts = cu[:-1]
    first = starts + cp_rank * chunk
    second = starts + (parts - 1 - cp_rank) * chunk
    # Per document: chunk positions of the first piece, then of the second.
    piece_starts = torch.stack([first, second], dim=1).flatten()
    piece_lens = torch.stack([chunk, chunk], dim=1).flatten()
    total = int(piece_lens.sum())
    offsets = torch.repeat_interleave(piece_starts - (torch.cumsum(piece_lens, 0) - piece_lens),
                                      piece_lens, output_size=total)
    return torch.arange(total, dtype=torch.int64) + offsets


@dataclass
class PackedRow:
    """One packed row laid out for THD: documents padded to the pad multiple, row cut at the
    sequence length. Arrays are [seq_length]."""

    index: np.ndarray       # source position of each slot in the original row, -1 = pad
    cu_seqlens: np.ndarray  # int32 padded document offsets, [docs + 1]
    doc_positions: np.ndarray  # position of each slot inside its document (0..)
    pad_tokens: int         # pad slots in the row
    dropped_tokens: int     # real tokens cut from the row's end


def pack_row(document_starts: list[int] | np.ndarray, seq_length: int,
             pad_multiple: int) -> PackedRow:
    """Lay out one row's documents (given by their start offsets in a row of `seq_length`
    tokens) with each document padded to `pad_multiple`, keeping exactly `seq_length` slots.

    Args:
        document_starts: sorted start offsets, the first 0.
        seq_length: row length before and after packing; a multiple of `pad_multiple`.
        pad_multiple: `thd_pad_multiple(cp)`.
    """
    if seq_length % pad_multiple:
        raise ValueError(f"--seq-length ({seq_length}) must be a multiple of {pad_multiple}")
    starts = np.asarray(sorted({0, *(int(s) for s in document_starts)}), dtype=np.int64)
    lengths = np.diff(np.append(starts, seq_length))
    padded = -(-lengths // pad_multiple) * pad_multiple
    ends = np.cumsum(padded)
    keep = int(np.searchsorted(ends, seq_length, side="left")) + 1  # docs that start inside
    keep = min(keep, len(lengths))
    padded = padded[:keep].copy()
    lengths = lengths[:keep].copy()
    cu = np.concatenate([[0], np.cumsum(padded)])
    if cu[-1] > seq_length:  # cut the last document's tail (stays a multiple: seq is)
        padded[-1] -= cu[-1] - seq_length
        cu[-1] = seq_length
    real = np.minimum(lengths, padded)
    dropped = int(seq_length - real.sum())  # real tokens of the input row not kept
    index = np.full(seq_length, -1, dtype=np.int64)
    doc_positions = np.empty(seq_length, dtype=np.int64)
    for d in range(keep):
        a, n = int(cu[d]), int(real[d])
        index[a:a + n] = np.arange(starts[d], starts[d] + n)
        doc_positions[a:int(cu[d + 1])] = np.arange(int(padded[d]))
    pads = int((index < 0).sum())
    return PackedRow(index=index, cu_seqlens=cu.astype(np.int32), doc_positions=doc_positions,
                     pad_tokens=pads, dropped_tokens=dropped)


@dataclass
class ThdSeqParams(PackedSeqParams):
    """THD `packed_seq_params` (every field TE reads is a base PackedSeqParams field) plus
    what our rotary embedding needs.

    Attributes:
        row_length: --seq-length; length-dependent RoPE (dynamic NTK, LongRoPE) computes its
            frequencies from it, not from the document lengths.
        reset_position_ids: RoPE positions restart at 0 per document (`--reset-position-ids`);
            otherwise each token keeps its position in the packed row.
        total_tokens: cu_seqlens[-1] as a host int (no device read per forward).
    """

    row_length: int = 0
    reset_position_ids: bool = False
    total_tokens: int = 0


def thd_seq_params(cu_seqlens: Tensor, row_length: int, reset_position_ids: bool,
                   device: torch.device | None = None) -> ThdSeqParams:
    """ThdSeqParams with cu_seqlens = cu_seqlens_padded (int32, global offsets) and
    max_seqlen the longest padded document."""
    cu = cu_seqlens.to(dtype=torch.int32, device=device)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return ThdSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
        cu_seqlens_kv_padded=cu, max_seqlen_q=longest, max_seqlen_kv=longest,
        row_length=row_length, reset_position_ids=reset_position_ids,
        total_tokens=int(cu_seqlens[-1]))
