"""SDPA core attention: equals a naive softmax reference and megatron's local attention (TP1,
GQA), its prefix+causal flash merge is exact, and document masking equals running the
documents separately (single process)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_longctx.config.model import ParallelConfig
from megatron_longctx.config.presets import get_preset
from tests.distributed.spawn import run_distributed

torch.set_num_threads(1)


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           allowed: torch.Tensor) -> torch.Tensor:
    """[sq, b, H, d] x [sk, b, G, d] -> [sq, b, H*d] with an explicit [sq, sk] keep-mask."""
    sq, b, heads, d = q.shape
    rep = heads // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q.double(), k.double()) / d**0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v.double())
    return out.reshape(sq, b, heads * d)


def _config():
    from megatron_longctx.model.build import build_transformer_config

    return build_transformer_config(replace(get_preset("tiny"), seq_length=32), ParallelConfig())


def _qkv(seq: int, heads: int = 4, groups: int = 2, d: int = 16, b: int = 2,
         grad: bool = True) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(seq, b, heads, d, generator=gen)
    k = torch.randn(seq, b, groups, d, generator=gen)
    v = torch.randn(seq, b, groups, d, generator=gen)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def _core(config):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_longctx.model.attention import SDPACoreAttention

    return SDPACoreAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                             attention_type="self", cp_comm_type=None, softmax_scale=None,
                             pg_collection=None)


def test_sdpa_matches_naive_causal_gqa() -> None:
    from megatron.core.transformer.enums import AttnMaskType

    q, k, v = _qkv(32)
    out = _core(_config())(q, k, v, None, attn_mask_type=AttnMaskType.causal,
                           attention_bias=None, packed_seq_params=None)
    ref = _naive(q, k, v, torch.ones(32, 32, dtype=torch.bool).tril())
    assert out.shape == (32, 2, 64)
    assert (out.double() - ref).abs().max() < 1e-5
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() < 1e-5


def _megatron_local(rank: int, world: int) -> float:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_longctx.parallel.init import initialize_model_parallel, set_seed

    initialize_model_parallel(ParallelConfig())
    set_seed(0)
    config = _config()
    q, k, v = _qkv(32, grad=False)
    ref = DotProductAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                              attention_type="self")
    want = ref(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    got = _core(config)(q, k, v, None, attn_mask_type=AttnMaskType.causal,
                        attention_bias=None, packed_seq_params=None)
    return (got - want).abs().max().item()


def test_sdpa_matches_megatron_local_attention() -> None:
    assert run_distributed(_megatron_local, 1)[0] < 1e-5


@pytest.mark.parametrize("prefix", [1, 17, 48])
def test_prefix_causal_flash_is_exact(prefix: int) -> None:
    from megatron_longctx.model.attention import prefix_causal_attention

    gen = torch.Generator().manual_seed(prefix)
    length, d = 16, 8
    q = torch.randn(2, 3, length, d, generator=gen, requires_grad=True)
    k = torch.randn(2, 3, prefix + length, d, generator=gen, requires_grad=True)
    v = torch.randn(2, 3, prefix + length, d, generator=gen, requires_grad=True)
    out = prefix_causal_attention(q, k, v, prefix)
    rows = torch.arange(length).unsqueeze(1) + prefix
    allowed = torch.arange(prefix + length).unsqueeze(0) <= rows
    scores = (q.double() @ k.double().transpose(-1, -2)) / d**0.5
    ref = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.double()
    assert (out.double() - ref).abs().max() < 1e-5
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g),
                    torch.autograd.grad(ref, (q, k, v), g.double())):
        assert (a.double() - b).abs().max() < 1e-5


def test_document_mask_attention_matches_naive() -> None:
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_longctx.model.attention import document_seq_params

    starts = [[0, 5, 20], [0, 31]]
    q, k, v = _qkv(32)
    out = _core(_config())(q, k, v, None, attn_mask_type=AttnMaskType.causal,
                           attention_bias=None,
                           packed_seq_params=document_seq_params(starts, 32))
    for i, sample in enumerate(starts):
        doc = torch.zeros(32, dtype=torch.long)
        for s in sample[1:]:
            doc[s:] += 1
        allowed = (doc.unsqueeze(1) == doc.unsqueeze(0)) & torch.ones(32, 32).tril().bool()
        ref = _naive(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], allowed)
        assert (out[:, i:i + 1].double() - ref).abs().max() < 1e-5


def _documents_vs_separate(rank: int, world: int) -> dict:
    from megatron_longctx.model.attention import document_seq_params, document_starts_from_eod
    from megatron_longctx.model.build import build_model
    from megatron_longctx.parallel.init import initialize_model_parallel, set_seed

    initialize_model_parallel(ParallelConfig())
    set_seed(11)
    model = build_model(replace(get_preset("tiny"), seq_length=48), ParallelConfig())
    eod = 0
    gen = torch.Generator().manual_seed(5)
    lengths = [13, 24, 11]
    docs = [torch.randint(1, 512, (n,), generator=gen) for n in lengths]
    for doc in docs[:-1]:
        doc[-1] = eod
    tokens = torch.cat(docs).unsqueeze(0)
    labels = torch.randint(1, 512, tokens.shape, generator=gen)
    starts = document_starts_from_eod(tokens, eod)
    packed = model(tokens, None, None, labels=labels,
                   packed_seq_params=document_seq_params(starts, tokens.shape[1]))
    packed.sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    pieces, offset = [], 0
    for doc in docs:
        n = doc.numel()
        pieces.append(model(doc.unsqueeze(0), None, None, labels=labels[:, offset:offset + n]))
        offset += n
    separate = torch.cat(pieces, dim=1)
    separate.sum().backward()
    plain = model(tokens, None, None, labels=labels)
    return {
        "starts": starts,
        "loss_err": (packed - separate).abs().max().item(),
        "grad_err": max((packed_grads[n] - p.grad).abs().max().item()
                        for n, p in model.named_parameters()),
        "unmasked_diff": (plain - separate).abs().max().item(),
    }


def test_document_masking_equals_separate_documents() -> None:
    result = run_distributed(_documents_vs_separate, 1)[0]
    assert result["starts"] == [[0, 13, 37]]
    assert result["loss_err"] < 1e-5
    assert result["grad_err"] < 1e-5
    assert result["unmasked_diff"] > 1e-3  # without the mask documents do see each other


@pytest.mark.parametrize("prefix,length", [(12, 8), (1, 5), (40, 24)])
def test_cuda_prefix_path_equals_cpu_merge(prefix: int, length: int) -> None:
    """The CUDA kernel choice for CP chunks, document pieces and chunked prefill (SDPA with a
    lower-right CausalBias) computes what the CPU flash/LSE merge computes, values and
    gradients (run here on CPU, where torch materialises the bias)."""
    from megatron_longctx.model.attention import (
        lower_right_causal_attention,
        prefix_causal_attention,
    )

    g = torch.Generator().manual_seed(prefix)
    q = torch.randn(2, 4, length, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 4, prefix + length, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 4, prefix + length, 16, generator=g, requires_grad=True)
    merged = prefix_causal_attention(q, k, v, prefix, scale=0.2)
    biased = lower_right_causal_attention(q, k, v, scale=0.2)
    assert torch.allclose(merged, biased, atol=1e-5)
    grads_m = torch.autograd.grad(merged.square().sum(), (q, k, v))
    grads_b = torch.autograd.grad(biased.square().sum(), (q, k, v))
    for a, b in zip(grads_m, grads_b):
        assert torch.allclose(a, b, atol=1e-5)
    # The reference: query i sees keys 0..prefix+i, computed densely in float64.
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * 0.2
    allowed = (torch.arange(prefix + length)[None, :]
               <= torch.arange(length)[:, None] + prefix)
    want = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.double()
    assert torch.allclose(merged.double(), want, atol=1e-5)


def test_no_dense_mask_off_cpu(monkeypatch) -> None:
    """Off the CPU, prefix attention hands SDPA a CausalBias (a mask type the CUDA kernels take
    directly), never a boolean/float tensor: at 128K with CP4 such a mask was 2-4 GiB per
    layer, kept for backward."""
    from torch.nn.attention.bias import CausalBias

    from megatron_longctx.model import attention

    seen = []
    real = attention.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(attention, "_FLASH_CPU", None)  # what a CUDA tensor sees
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    attention.prefix_causal_attention(q, k, v, 6)
    assert len(seen) == 1 and isinstance(seen[0], CausalBias)


def _cp_gqa(rank: int, world: int) -> dict:
    """One CP rank's attention over its two chunks with 8 query heads and 2 K/V groups: the
    K/V read at G heads (native GQA) and expanded to H (forced), allocations recorded."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_longctx.model import attention
    from megatron_longctx.parallel.context_parallel import split_batch_for_cp
    from megatron_longctx.parallel.init import initialize_model_parallel
    from tests.allocations import Allocations

    initialize_model_parallel(ParallelConfig(context_parallel_size=world))
    seq, heads, groups, d, b = 64, 8, 2, 16, 1
    config = replace(_config(), context_parallel_size=world, num_attention_heads=heads,
                     num_query_groups=groups, kv_channels=d)
    full = _qkv(seq, heads=heads, groups=groups, d=d, b=b, grad=False)
    positions = split_batch_for_cp({"p": torch.arange(seq).view(1, seq)}, world,
                                   rank)["p"].flatten()
    runs = {}
    for name, native in (("native", attention.native_gqa), ("expanded", lambda q, k: False)):
        attention.native_gqa, real = native, attention.native_gqa
        try:
            q, k, v = (t[positions].clone().requires_grad_() for t in full)
            core = attention.SDPACoreAttention(
                config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                pg_collection=None)
            assert core.cp_group is ps.get_context_parallel_group()
            with Allocations() as seen:
                out = core(q, k, v, None, attn_mask_type=AttnMaskType.causal)
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        finally:
            attention.native_gqa = real
        # K/V tensors at H heads: [b, H, keys, d] with more keys than one chunk's queries
        # (the concatenated output [b, H, 2 chunks, d] is the one other such tensor)
        kv_at_h = [(op, s) for op, shapes in seen.ops for s in shapes
                   if len(s) == 4 and s[1] == heads and s[2] > seq // 4 and op != "cat"]
        runs[name] = {"out": out.detach(), "grads": [g.detach() for g in grads],
                      "kv_at_h": len(kv_at_h), "bytes": seen.bytes}
    ref = _naive(*full, torch.ones(seq, seq, dtype=torch.bool).tril())
    return {"same_out": torch.equal(runs["native"]["out"], runs["expanded"]["out"]),
            "grad_diff": max((a - b).abs().max().item() for a, b in
                             zip(runs["native"]["grads"], runs["expanded"]["grads"])),
            "ref_diff": (runs["native"]["out"].double()
                         - ref[positions].detach()).abs().max().item(),
            "kv_at_h": {k: r["kv_at_h"] for k, r in runs.items()},
            "bytes": {k: r["bytes"] for k, r in runs.items()}}


def test_cp_attention_reads_gqa_kv_in_place() -> None:
    """CP2, 8 query heads over 2 K/V groups: the CP path hands the kernels the 2 groups
    (no [b, 8, keys, d] K/V copy is allocated, measured op by op) and computes what the
    expanded K/V computed: the same output bitwise, gradients within 1e-6, and the naive
    reference within 1e-5."""
    for result in run_distributed(_cp_gqa, 2):
        assert result["same_out"]
        assert result["grad_diff"] < 1e-6
        assert result["ref_diff"] < 1e-5
        assert result["kv_at_h"]["native"] == 0 and result["kv_at_h"]["expanded"] > 0
        assert result["bytes"]["native"] < result["bytes"]["expanded"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("prefix", [0, 192])
def test_cuda_flash_reads_gqa_kv_like_the_expanded_copy(prefix: int) -> None:
    """On CUDA in bf16 with head dim 128 the flash kernel takes the K/V groups (SDPA
    `enable_gqa`); output equal to the expanded K/V's, gradients within bf16 rounding."""
    from megatron_longctx.model.attention import native_gqa, prefix_causal_attention

    gen = torch.Generator(device="cuda").manual_seed(prefix)
    length, heads, groups, d = 256, 8, 2, 128

    def rand(h: int, n: int) -> torch.Tensor:
        return torch.randn(1, h, n, d, device="cuda", generator=gen).bfloat16().requires_grad_()

    q, k, v = rand(heads, length), rand(groups, prefix + length), rand(groups, prefix + length)
    assert native_gqa(q, k)
    out = prefix_causal_attention(q, k, v, prefix)
    expanded = prefix_causal_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                       prefix)
    assert torch.equal(out, expanded)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g),
                    torch.autograd.grad(expanded, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
