"""SDPA core attention for megatron's local layer spec: causal, GQA, exact context parallelism
and optional intra-document masking, none of which builds an s x s mask.

Interface (megatron-core 0.16.1 `CoreAttention` protocol, transformer/attention.py):
constructed with keywords (config, layer_number, attn_mask_type, attention_type, cp_comm_type,
softmax_scale, pg_collection); `forward(query, key, value, attention_mask, *, attn_mask_type,
attention_bias, packed_seq_params)` with query [sq, b, heads_per_tp, d] and key/value
[sk, b, groups_per_tp, d]; returns [sq, b, heads_per_tp * d].

Paths, cheapest first:

1. No CP, no documents: one `scaled_dot_product_attention(..., is_causal=True)`; no mask
   tensor at all.
2. Context parallel (Megatron's load-balanced layout: this rank holds global chunks r and
   2cp-1-r of 2cp). K/V are all-gathered over the CP group (`gather_cp`: the backward
   reduce-scatters the gradient, so each rank gets exactly its tokens' gradient) and put back in
   global order. Local chunk c with global start g attends to keys [0, g + C): a fully visible
   prefix [0, g) plus a C x C causal diagonal block. `prefix_causal_attention` computes the two
   parts with the CPU flash kernel, which also returns the log-sum-exp, and merges them
   exactly (the merge of ring attention); its backward calls the flash backward for each part
   with the merged output and LSE. No mask is materialised. A dense boolean mask for the same
   chunk would be C x (g + C) bytes: at 128K with CP=8 (C = 8K) up to 1 GiB per chunk per
   layer, the reason Megatron issue #1025 warns against dense masks. Cost of the all-gather:
   K and V of the full sequence for this rank's KV heads, 2 * S * groups_per_tp * d * bytes
   (LLaMA-2 7B, TP=8, S=128K, bf16: 2 * 131072 * 4 * 128 * 2 = 256 MiB per layer), and the
   gather does not overlap compute (no p2p ring): this path is exact and simple, for CPU/CI and
   as a fallback; production GPU runs use Transformer Engine's attention (p2p/a2a CP).
3. Intra-document masking (`DocumentSeqParams` through `packed_seq_params`): every (local
   chunk, document) intersection is one `prefix_causal_attention` call on the keys of that
   document only. Work and memory are those of running the documents separately (flash, no
   s x s mask); the cost is one Python-level call per intersection: at 128K with C4-like
   315-token documents, ~416 calls per sample per layer.

4. THD micro-batches (`packed_seq_params.qkv_format == "thd"`, what the trainer feeds with
   --reset-attention-mask; layout in parallel/thd.py): the CPU twin of Transformer Engine's
   THD attention. Query/key/value arrive as [t, heads, d] holding, of every document, chunks r
   and 2cp-1-r; K/V are all-gathered over CP and put back in row order (the inverse of the
   split), and each local chunk attends to its document's keys up to itself
   (`prefix_causal_attention`: flash + LSE merge on CPU, lower-right CausalBias on CUDA). The
   documents come from cu_seqlens_q_padded, exactly as TE reads them, so the batch proven
   here on CPU is the one TE gets. Path 3 (DocumentSeqParams on [s, b]) stays for callers
   that keep the batch dimension.

Measured on this 2-core CPU (fp32, 8 heads x 64, b=1, 2 threads, other jobs running, so
+-30%), forward / backward / peak memory above inputs; "CP2" runs both CP ranks' local work
one after the other in one process (the same total FLOPs as one causal pass):

    tokens  path                                  fwd      bwd      memory
    4096    SDPA is_causal (path 1)               0.36 s   0.88 s    50 MB
    4096    naive s x s softmax + mask            1.72 s   3.22 s  1578 MB
    4096    CP2 prefix + flash merge (path 2)     0.54 s   1.23 s   131 MB
    4096    CP2 with a dense mask per chunk       0.42 s   1.17 s   106 MB
    16384   SDPA is_causal (path 1)               3.71 s  10.94 s   170 MB
    16384   CP2 prefix + flash merge (path 2)     3.81 s  10.46 s   455 MB
    16384   CP2 with a dense mask per chunk       6.12 s  12.09 s   794 MB

At 4K the per-chunk mask is only 4 MB and the two CP variants tie; by 16K the merge is 1.6x
faster forward and needs 43% less memory, and the gap grows with length (mask bytes ~ S^2/cp).
Path 2 keeps per-segment contiguous K/V copies for backward (~2.5x one K/V at CP2), which is
its memory above path 1.

Kernels per path and device (no path builds a dense mask on CUDA):

    path                          CPU                                 CUDA
    1 causal, no CP/documents     SDPA is_causal (flash for CPU)      SDPA is_causal (flash)
    2 CP chunk vs prefix+diagonal flash + LSE merge (2 calls)         SDPA, lower-right CausalBias
    3 document pieces             as path 2, one call per piece       as path 2, one per piece
    KV-cache decode (1 token)     SDPA, no mask                       SDPA, no mask
    chunked prefill (sq < sk)     flash + LSE merge                   SDPA, lower-right CausalBias
    explicit padding mask         SDPA with the caller's mask         same (the caller's tensor)

The lower-right CausalBias is a mask type the CUDA flash / memory-efficient kernels take
directly; on CPU torch would materialise it, hence the flash/LSE merge there.

Attention dropout is supported on path 1 only (LLaMA trains with 0).

KV-cache inference (megatron's `StaticInferenceContext`, used by megatron_longctx.eval): a step
feeds sq new tokens against sk = cached + sq keys. Torch SDPA's `is_causal=True` is top-left
aligned (query i sees keys 0..i), which is wrong when sq < sk; and megatron itself downgrades
the mask to `no_mask` once the cache is non-empty, which is exact only for sq == 1. Path 1
therefore treats sk > sq under a causal module as bottom-right causal (query i sees keys
0..sk-sq+i): one unmasked SDPA call for a single decode token, `prefix_causal_attention`
(no mask tensor on CPU) for a chunk of a chunked prefill. Paths 2 and 3 refuse a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward",
                         None)


# --------------------------------------------------------------------------------------------
# intra-document masking parameters
# --------------------------------------------------------------------------------------------
@dataclass
class DocumentSeqParams(PackedSeqParams):
    """`packed_seq_params` carrying per-sample document start offsets (global positions).

    `qkv_format` is 'sbhd', so megatron treats the batch as ordinary [s, b] (no THD squeeze);
    `max_seqlen_q/kv` must be the global sequence length because GPTModel sizes the RoPE table
    from them when packed_seq_params is given. RoPE keeps global positions; it is relative, so
    attention inside a document equals running the document alone at positions 0.. (to float
    rounding). Build with `document_seq_params`.

    Attributes:
        document_starts: one tuple per sample of sorted start offsets, the first being 0.
    """

    document_starts: tuple[tuple[int, ...], ...] = ()


def document_seq_params(
    document_starts: list[list[int]] | tuple[tuple[int, ...], ...], seq_length: int
) -> DocumentSeqParams:
    """DocumentSeqParams for a batch: offsets are normalised (sorted, unique, 0 added).

    Args:
        document_starts: per sample, global positions where a document starts.
        seq_length: global (pre-CP-split) sequence length.
    """
    norm = []
    for starts in document_starts:
        clean = sorted({0, *(int(s) for s in starts)})
        if clean[-1] >= seq_length or clean[0] < 0:
            raise ValueError(f"document start {clean[-1]} outside sequence length {seq_length}")
        norm.append(tuple(clean))
    return DocumentSeqParams(
        qkv_format="sbhd",
        max_seqlen_q=seq_length,
        max_seqlen_kv=seq_length,
        document_starts=tuple(norm),
    )


def document_starts_from_eod(tokens: Tensor, eod_id: int) -> list[list[int]]:
    """Per sample, the positions that follow an EOD token (plus 0): the document starts."""
    starts = []
    for row in tokens.detach().cpu():
        after = (row == eod_id).nonzero().flatten() + 1
        starts.append([0, *[int(p) for p in after if p < row.numel()]])
    return starts


# --------------------------------------------------------------------------------------------
# CP all-gather with reduce-scatter backward
# --------------------------------------------------------------------------------------------
class _GatherAlongFirstDim(torch.autograd.Function):
    """All-gather along dim 0 over `group`; backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.contiguous()
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        world = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = torch.empty((grad.shape[0] // world, *grad.shape[1:]), dtype=grad.dtype,
                          device=grad.device)
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


def gather_cp(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """All-gather a CP-local [s_local, ...] tensor into global sequence order [S, ...].

    Ranks hold chunks (r, 2cp-1-r); the gathered tensor in rank order is reordered so chunk j
    lands at position j. Gradients flow back to the owning rank (reduce-scatter).
    """
    cp = dist.get_world_size(group)
    gathered = _GatherAlongFirstDim.apply(x, group)
    chunk = x.shape[0] // 2
    # slot of global chunk j in rank order: rank j slot 0 (j < cp), rank 2cp-1-j slot 1 (j >= cp)
    order = [2 * j if j < cp else 2 * (2 * cp - 1 - j) + 1 for j in range(2 * cp)]
    idx = torch.tensor(order, device=x.device)
    view = gathered.view(2 * cp, chunk, *x.shape[1:]).index_select(0, idx)
    return view.reshape(2 * cp * chunk, *x.shape[1:])


# --------------------------------------------------------------------------------------------
# prefix + causal block attention
# --------------------------------------------------------------------------------------------
class _PrefixCausalFlash(torch.autograd.Function):
    """Queries attend fully to k[:prefix] and causally to k[prefix:] (same length as q).

    Forward: two CPU flash calls returning (out, lse), merged with
    o = sum_i o_i * exp(lse_i - lse), lse = logaddexp(lse_1, lse_2).
    Backward: flash backward of each part with the merged o and lse (P_i = exp(S_i - lse) are
    then the true probabilities restricted to part i, and D = rowsum(dO * o) is global).
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, prefix: int,
                scale: float) -> Tensor:
        kp, vp = k[:, :, :prefix].contiguous(), v[:, :, :prefix].contiguous()
        kd, vd = k[:, :, prefix:].contiguous(), v[:, :, prefix:].contiguous()
        o1, l1 = _FLASH_CPU(q, kp, vp, 0.0, False, scale=scale)
        o2, l2 = _FLASH_CPU(q, kd, vd, 0.0, True, scale=scale)
        lse = torch.logaddexp(l1, l2)
        out = (o1.float() * torch.exp(l1 - lse).unsqueeze(-1)
               + o2.float() * torch.exp(l2 - lse).unsqueeze(-1)).to(q.dtype).contiguous()
        ctx.save_for_backward(q, kp, vp, kd, vd, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, kp, vp, kd, vd, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq1, dk1, dv1 = _FLASH_CPU_BWD(grad_out, q, kp, vp, out, lse, 0.0, False,
                                       scale=ctx.scale)
        dq2, dk2, dv2 = _FLASH_CPU_BWD(grad_out, q, kd, vd, out, lse, 0.0, True,
                                       scale=ctx.scale)
        return dq1 + dq2, torch.cat([dk1, dk2], dim=2), torch.cat([dv1, dv2], dim=2), None, None


def prefix_causal_attention(q: Tensor, k: Tensor, v: Tensor, prefix: int,
                            scale: float | None = None) -> Tensor:
    """Attention where query i (of L) sees keys [0, prefix + i] ("bottom-right" causal).

    Args:
        q: [B, H, L, d].
        k, v: [B, G, prefix + L, d]: G = H, or G < H key/value groups (GQA, query head h uses
            group h // (H / G)) where `native_gqa` says the kernel reads them in place.
        prefix: keys every query sees.
        scale: softmax scale, default 1/sqrt(d).

    Returns:
        [B, H, L, d].

    Prefix 0 is plain `is_causal=True` SDPA. Otherwise, on CPU, the flash/LSE merge of
    `_PrefixCausalFlash`; on CUDA, `lower_right_causal_attention` (one SDPA call with a
    lower-right CausalBias, run by the flash or memory-efficient kernel). Neither builds a
    mask tensor.
    """
    length = q.shape[2]
    if k.shape[2] != prefix + length:
        raise ValueError(f"keys ({k.shape[2]}) must be prefix ({prefix}) + queries ({length})")
    gqa = k.shape[1] != q.shape[1]
    if prefix == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              **({"enable_gqa": True} if gqa else {}))
    if q.device.type == "cpu" and _FLASH_CPU is not None and _FLASH_CPU_BWD is not None:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return _PrefixCausalFlash.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                        prefix, scale)
    return lower_right_causal_attention(q, k, v, scale)


def native_gqa(q: Tensor, k: Tensor) -> bool:
    """Whether `prefix_causal_attention` can take G < H key/value heads as they are.

    Exact where the kernel reads group h // (H / G) for query head h itself, as the expanded
    copy would: the forward is bitwise that of the expanded K/V (tests/distributed/
    test_attention.py); the K/V gradient sums the group's heads inside the kernel instead of
    in autograd's repeat_interleave backward (a different summation order: <= 1 fp32 ulp
    apart in the tests). That holds for the CPU flash kernels (both directions take G heads)
    and CUDA's flash kernel (SDPA `enable_gqa`, torch >= 2.5). CUDA's memory-efficient kernel
    has no GQA: SDPA would fall back to the math kernel, which materialises the [L, S] scores
    (and the lower-right bias as a dense mask), so there (fp32, head dim > 256, other devices)
    the caller expands K/V as before. Saved: K/V copies at H instead of G heads per chunk,
    kept for backward (LLaMA-3 8B at TP2, CP4, 128K: ~1.2 GB per layer).
    """
    if k.shape[1] == q.shape[1]:
        return True
    if q.device.type == "cpu":
        return _FLASH_CPU is not None and _FLASH_CPU_BWD is not None
    if q.device.type != "cuda":
        return False
    try:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention

        return bool(can_use_flash_attention(SDPAParams(q, k, k, None, 0.0, False, True)))
    except (ImportError, TypeError, RuntimeError):  # torch < 2.5: no enable_gqa
        return False


def lower_right_causal_attention(q: Tensor, k: Tensor, v: Tensor,
                                 scale: float | None = None) -> Tensor:
    """Query i of L sees keys [0, S - L + i] (S = keys): SDPA with torch's lower-right
    `CausalBias`, which the CUDA flash and memory-efficient kernels take as a mask *type*
    (no L x S tensor; a dense boolean mask for one 16K CP chunk against 128K keys would be
    2 GiB per layer, kept for backward). On CPU torch materialises the bias (math kernel),
    which is why `prefix_causal_attention` uses the flash/LSE merge there; the tests run this
    function on CPU to check it against that merge."""
    from torch.nn.attention.bias import causal_lower_right

    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2],
                                                                                k.shape[2]),
                                          scale=scale, **gqa)


def _expand_kv(x: Tensor, heads: int) -> Tensor:
    """[B, G, S, d] -> [B, H, S, d]; query head h uses group h // (H / G) (Megatron's order)."""
    groups = x.shape[1]
    return x if groups == heads else x.repeat_interleave(heads // groups, dim=1)


def _segments_for_chunks(
    chunks: list[tuple[int, int, int]], starts: tuple[int, ...] | None, seq_length: int
) -> list[tuple[int, int, int, int]]:
    """(local q start, q length, global key start, prefix) for each (chunk, document) piece.

    `chunks` lists (local start, global start, length) of the local query chunks, in local
    order; `starts` are document starts (None = one document).
    """
    bounds = [0, seq_length] if starts is None else [*starts, seq_length]
    pieces = []
    for local0, global0, length in chunks:
        end = global0 + length
        for a, e in zip(bounds[:-1], bounds[1:]):
            qa, qe = max(a, global0), min(e, end)
            if qa < qe:
                pieces.append((local0 + qa - global0, qe - qa, a, qa - a))
    return pieces


# --------------------------------------------------------------------------------------------
# the core attention module
# --------------------------------------------------------------------------------------------
class SDPACoreAttention(MegatronModule):
    """Core attention for megatron's local spec on torch SDPA (see the module docstring)."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        cp_comm_type: str | None = None,
        softmax_scale: float | None = None,
        pg_collection: Any = None,
        **_: Any,
    ) -> None:
        super().__init__(config=config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.cp_comm_type = cp_comm_type
        self.softmax_scale = softmax_scale
        self.attention_dropout = config.attention_dropout
        if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
            self.cp_group = pg_collection.cp
        else:
            from megatron.core import parallel_state

            self.cp_group = (parallel_state.get_context_parallel_group(check_initialized=False)
                             if config.context_parallel_size > 1 else None)

    def _cp_size(self) -> int:
        if self.cp_group is None:
            return 1
        return dist.get_world_size(self.cp_group)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        """[sq, b, H, d] x [sk, b, G, d] -> [sq, b, H * d]."""
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention does not support attention_bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._thd(query, key, value, attention_mask, packed_seq_params)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, heads, d = query.shape
        q = query.permute(1, 2, 0, 3)  # [b, H, sq, d]
        cp = self._cp_size()
        docs = packed_seq_params.document_starts if isinstance(
            packed_seq_params, DocumentSeqParams) and packed_seq_params.document_starts else None
        if docs is not None and len(docs) != b:
            raise ValueError(f"DocumentSeqParams has {len(docs)} samples, batch has {b}")
        # CP / document paths implement pure causal masking; a padding mask would be dropped.
        causal = mask_type == AttnMaskType.causal or (
            mask_type == AttnMaskType.padding_causal and attention_mask is None)

        if cp == 1 and docs is None:
            k, v = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)  # [b, G, sk, d]
            if key.shape[0] > sq and self._cached_step(attention_mask, mask_type):
                out = self._bottom_right_causal(q, k, v)
            else:
                out = self._plain(q, _expand_kv(k, heads), _expand_kv(v, heads),
                                  attention_mask, mask_type)
        else:
            if key.shape[0] != sq:
                raise NotImplementedError(
                    "KV-cache inference (more keys than queries) is not supported with context "
                    "parallelism or document masking")
            if not causal:
                raise NotImplementedError(
                    "context parallelism / document masking support causal masks only "
                    f"(got {mask_type.name} with mask {attention_mask is not None})")
            if self.training and self.attention_dropout > 0:
                raise NotImplementedError(
                    "attention dropout is not supported with context parallelism or document "
                    "masking (set --attention-dropout 0)")
            if cp > 1:
                key, value = gather_cp(key, self.cp_group), gather_cp(value, self.cp_group)
                rank = dist.get_rank(self.cp_group)
                chunk = sq // 2
                chunks = [(0, rank * chunk, chunk), (chunk, (2 * cp - 1 - rank) * chunk, chunk)]
            else:
                chunks = [(0, 0, sq)]
            k_all = key.permute(1, 2, 0, 3)  # [b, G, S, d]
            v_all = value.permute(1, 2, 0, 3)
            seq = k_all.shape[2]
            # K/V stay at G heads where the kernel reads them in place (`native_gqa`).
            kv_heads = k_all.shape[1] if native_gqa(q, k_all) else heads
            per_sample = []
            for i in range(b if docs is not None else 1):
                sel = slice(i, i + 1) if docs is not None else slice(None)
                starts = docs[i] if docs is not None else None
                pieces = []
                for l0, length, k0, prefix in _segments_for_chunks(chunks, starts, seq):
                    k_end = k0 + prefix + length
                    pieces.append(prefix_causal_attention(
                        q[sel, :, l0:l0 + length],
                        _expand_kv(k_all[sel, :, k0:k_end], kv_heads),
                        _expand_kv(v_all[sel, :, k0:k_end], kv_heads),
                        prefix, self.softmax_scale))
                per_sample.append(torch.cat(pieces, dim=2))
            out = torch.cat(per_sample, dim=0)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * d)

    def _thd(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
             params: PackedSeqParams) -> Tensor:
        """Per-document causal attention on a THD micro-batch (path 4, the CPU twin of
        Transformer Engine's THD attention): query [t, H, d], key/value [t, G, d] in the layout
        of `parallel.thd` (this CP rank holds chunks r and 2cp-1-r of every document);
        cu_seqlens_q_padded are global offsets. K/V are all-gathered over the CP group and put
        back in row order; each local chunk of a document attends to its document's keys up to
        itself (`prefix_causal_attention`). Returns [t, H * d]."""
        from megatron_longctx.parallel.thd import thd_partition_indices

        if attention_mask is not None:
            raise NotImplementedError("THD attention takes no attention mask (documents are "
                                      "given by cu_seqlens)")
        if self.training and self.attention_dropout > 0:
            raise NotImplementedError("attention dropout is not supported with document "
                                      "masking (set --attention-dropout 0)")
        if query.dim() == 4:  # [t, 1, H, d]: megatron squeezes the batch; accept either
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        if key.shape[0] != query.shape[0]:
            raise NotImplementedError("KV-cache inference is not supported on THD batches")
        t, heads, d = query.shape
        cu_tensor = params.cu_seqlens_q_padded
        if cu_tensor is None:
            cu_tensor = params.cu_seqlens_q
        cu = [int(x) for x in cu_tensor.tolist()]
        cp = self._cp_size()
        if cp > 1:
            rank = dist.get_rank(self.cp_group)
            gathered_k = _GatherAlongFirstDim.apply(key, self.cp_group)
            gathered_v = _GatherAlongFirstDim.apply(value, self.cp_group)
            slots = torch.cat([thd_partition_indices(cu, cp, r) for r in range(cp)])
            order = torch.empty_like(slots)
            order[slots] = torch.arange(slots.numel())
            order = order.to(key.device)
            key, value = gathered_k.index_select(0, order), gathered_v.index_select(0, order)
        else:
            rank = 0
        if cu[-1] != key.shape[0]:
            raise ValueError(f"cu_seqlens cover {cu[-1]} tokens, the packed row has "
                             f"{key.shape[0]}")
        q = query.permute(1, 0, 2).unsqueeze(0)  # [1, H, t, d]
        k_all = key.permute(1, 0, 2).unsqueeze(0)  # [1, G, T, d]
        v_all = value.permute(1, 0, 2).unsqueeze(0)
        pieces, local = [], 0
        for a, e in zip(cu[:-1], cu[1:]):
            if e == a:
                continue
            chunk = (e - a) // (2 * cp)
            owned = ([(a, e - a)] if cp == 1 else
                     [(a + rank * chunk, chunk), (a + (2 * cp - 1 - rank) * chunk, chunk)])
            for start, length in owned:
                prefix = start - a
                pieces.append(prefix_causal_attention(
                    q[:, :, local:local + length],
                    _expand_kv(k_all[:, :, a:start + length], heads),
                    _expand_kv(v_all[:, :, a:start + length], heads),
                    prefix, self.softmax_scale))
                local += length
        if local != t:
            raise ValueError(f"cu_seqlens give this rank {local} tokens, it holds {t}")
        out = torch.cat(pieces, dim=2)  # [1, H, t, d]
        return out[0].permute(1, 0, 2).reshape(t, heads * d)

    def _cached_step(self, attention_mask: Tensor | None, mask_type: AttnMaskType) -> bool:
        """Whether a call with more keys than queries is a KV-cache step of a causal module:
        causal as given, or `no_mask`, which megatron substitutes for the module's causal mask
        once its static KV cache is non-empty (transformer/attention.py,
        `_adjust_key_value_for_inference`). Padding masks keep their own meaning."""
        if attention_mask is not None or (self.training and self.attention_dropout > 0):
            return False
        return mask_type == AttnMaskType.causal or (
            mask_type == AttnMaskType.no_mask and self.attn_mask_type == AttnMaskType.causal)

    def _bottom_right_causal(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The sq queries [b, H, sq, d] are the last sq positions of the sk keys [b, G, sk, d]
        (KV-cache step). One decode token sees every cached key: no mask, and SDPA's
        `enable_gqa` reads the G key/value heads in place (expanding them to H copied the whole
        cache every step: 9 ms vs 0.6 ms per layer at 8K cached tokens, 8/4 heads, CPU)."""
        heads, sq, sk = q.shape[1], q.shape[2], k.shape[2]
        if sq == 1:
            return F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale,
                                                  enable_gqa=k.shape[1] != heads)
        return prefix_causal_attention(q, _expand_kv(k, heads), _expand_kv(v, heads), sk - sq,
                                       self.softmax_scale)

    def _plain(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None,
               mask_type: AttnMaskType) -> Tensor:
        """Non-CP path. Causal: `is_causal=True`, any given mask ignored (it is the causal
        one, as with TE). Other types with a mask (True = masked): that mask, combined with
        causality for padding_causal; this builds a dense mask, for short sequences only."""
        dropout = self.attention_dropout if self.training else 0.0
        mask, is_causal = None, mask_type == AttnMaskType.causal
        if not is_causal and attention_mask is not None:
            mask = ~attention_mask
            if mask_type == AttnMaskType.padding_causal:
                sq, sk = q.shape[2], k.shape[2]
                mask = mask & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        elif mask_type == AttnMaskType.padding_causal:
            is_causal = True

        def attend() -> Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                  is_causal=is_causal, scale=self.softmax_scale)

        if dropout > 0 and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            # Megatron draws attention dropout from the TP-rank-specific stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return attend()
        return attend()
