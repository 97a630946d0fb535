"""Oracle for intra-document attention: a dense block-diagonal causal mask over the packed row,
softmax in float64. Quadratic memory; for tests with a few hundred tokens only."""

from __future__ import annotations

import torch


def block_diagonal_causal_mask(cu_seqlens: list[int]) -> torch.Tensor:
    """[T, T] bool, True = query i may attend key j: same document and j <= i."""
    total = cu_seqlens[-1]
    doc = torch.empty(total, dtype=torch.long)
    for d, (a, e) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        doc[a:e] = d
    pos = torch.arange(total)
    return (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])


def dense_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             cu_seqlens: list[int], scale: float | None = None) -> torch.Tensor:
    """q [T, H, d], k/v [T, G, d] (GQA: head h uses group h // (H / G)) -> [T, H * d], float64."""
    total, heads, d = q.shape
    rep = heads // k.shape[1]
    k = k.double().repeat_interleave(rep, dim=1)
    v = v.double().repeat_interleave(rep, dim=1)
    scale = d ** -0.5 if scale is None else scale
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    scores = scores.masked_fill(~block_diagonal_causal_mask(cu_seqlens), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(total, heads * d)
