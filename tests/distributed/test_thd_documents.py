"""Document masking on THD micro-batches (the layout Transformer Engine takes): the SDPA twin
equals a dense block-diagonal-mask oracle (tests/reference) at CP1/CP2/CP4, and the whole model
at CP1, CP2 and TP2 x CP2 equals running every document alone through the same weights (fp32,
1e-5), on rows with documents shorter than, equal to and longer than 2*CP, one of length 1,
and one crossing the row's end."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from megatron_longctx.config.model import ParallelConfig
from megatron_longctx.config.presets import get_preset
from tests.distributed.spawn import run_distributed
from tests.distributed.test_model_parallel import _full_param
from tests.reference.dense_document_attention import dense_document_attention

torch.set_num_threads(1)

SEQ = 64
VOCAB = 512
EOD = VOCAB - 1
# Document starts per row. Row 0 at CP2 (multiple 4): lengths 1, 3, 4, 9, 13, 20, 14 pad to
# 4, 4, 4, 12, 16, 20, 16 = 76 slots, so the last document crosses the row's end (4 kept).
ROWS = [[0, 1, 4, 8, 17, 30, 50], [0, 33, 34, 40]]  # row 1: 33, 1, 6, 24 -> 72 slots


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    data = torch.randint(0, VOCAB - 1, (len(ROWS), SEQ + 1), generator=gen)
    segment = torch.zeros(len(ROWS), SEQ, dtype=torch.long)
    for i, starts in enumerate(ROWS):
        for s in starts[1:]:
            segment[i, s:] += 1
    loss_mask = torch.ones(len(ROWS), SEQ)
    loss_mask[0, 5] = 0  # a masked token inside a document
    return {"tokens": data[:, :-1].contiguous(), "labels": data[:, 1:].contiguous(),
            "loss_mask": loss_mask, "segment_ids": segment}


# ---------------------------------------------------------------------------------------------
# attention level: the SDPA twin vs the dense oracle
# ---------------------------------------------------------------------------------------------
def _attention(rank: int, world: int, cp: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_longctx.model.attention import SDPACoreAttention
    from megatron_longctx.model.build import build_transformer_config
    from megatron_longctx.parallel.init import initialize_model_parallel
    from megatron_longctx.parallel.thd import pack_row, thd_partition_indices, thd_seq_params

    parallel = ParallelConfig(context_parallel_size=cp)
    initialize_model_parallel(parallel)
    config = build_transformer_config(replace(get_preset("tiny"), seq_length=SEQ), parallel)
    core = SDPACoreAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal)
    row = pack_row(ROWS[0], SEQ, 2 * cp if cp > 1 else 1)
    cu = torch.from_numpy(row.cu_seqlens.astype("int64"))
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(SEQ, h, 16, generator=gen, dtype=torch.float64)
               for h in (4, 2, 2))
    grad = torch.randn(SEQ, 64, generator=gen, dtype=torch.float64)
    r = ps.get_context_parallel_rank()
    idx = thd_partition_indices(cu, cp, r)
    lq, lk, lv = (t.index_select(0, idx).float().requires_grad_() for t in (q, k, v))
    out = core(lq, lk, lv, None, attn_mask_type=AttnMaskType.causal,
               packed_seq_params=thd_seq_params(cu, SEQ, False))
    out.backward(grad.index_select(0, idx).float())
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    ref = dense_document_attention(qq, kk, vv, row.cu_seqlens.tolist())
    ref.backward(grad)
    errs = {"out": (out.double() - ref.index_select(0, idx)).abs().max().item()}
    for name, got, want in (("dq", lq, qq), ("dk", lk, kk), ("dv", lv, vv)):
        errs[name] = (got.grad.double() - want.grad.index_select(0, idx)).abs().max().item()
    return errs


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_sdpa_thd_equals_dense_block_diagonal_oracle(cp: int) -> None:
    for errs in run_distributed(_attention, cp, cp):
        assert max(errs.values()) < 1e-5, errs


# ---------------------------------------------------------------------------------------------
# model level: THD micro-batch vs every document run alone
# ---------------------------------------------------------------------------------------------
def _model(tp: int, cp: int):
    from megatron_longctx.model.build import build_model
    from megatron_longctx.parallel.init import initialize_model_parallel, set_seed

    parallel = ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp)
    initialize_model_parallel(parallel)
    set_seed(1234)
    return build_model(replace(get_preset("tiny"), seq_length=SEQ), parallel)


def _grads(model, cp: int) -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state as ps

    out = {}
    for name, param in model.named_parameters():
        grad = param.grad.detach().clone()
        if cp > 1:
            dist.all_reduce(grad, group=ps.get_context_parallel_group())
        out[name] = _full_param(param, grad)
    return out


def _thd_step(rank: int, world: int, tp: int, cp: int, reset: bool) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_longctx.training.data import build_thd_microbatch

    model = _model(tp, cp)
    mb = build_thd_microbatch(_batch(), cp_size=cp, cp_rank=ps.get_context_parallel_rank(),
                              seq_length=SEQ, eod=EOD, reset_position_ids=reset,
                              pad_multiple=4)
    per_token = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"],
                      packed_seq_params=mb["packed_seq_params"])
    mask = mb["loss_mask"].float()
    count = mask.sum()
    if cp > 1:
        dist.all_reduce(count, group=ps.get_context_parallel_group())
    loss = (per_token * mask).sum() / count
    loss.backward()
    total = loss.detach().clone()
    if cp > 1:
        dist.all_reduce(total, group=ps.get_context_parallel_group())
    grads = _grads(model, cp)  # collectives: every rank
    return {"loss": total.item(), "grads": grads if rank == 0 else None,
            "stats": mb["thd_stats"]}


def _documents_alone(rank: int, world: int) -> dict:
    """The oracle: every kept document (its real tokens) run alone, positions from 0."""
    from megatron_longctx.parallel.thd import pack_row

    model = _model(1, 1)
    batch = _batch()
    sums, count = [], 0.0
    for i, starts in enumerate(ROWS):
        row = pack_row(starts, SEQ, 4)
        for a, e in zip(row.cu_seqlens[:-1], row.cu_seqlens[1:]):
            src = torch.from_numpy(row.index[a:e])
            src = src[src >= 0]
            tokens = batch["tokens"][i, src].unsqueeze(0)
            labels = batch["labels"][i, src].unsqueeze(0)
            mask = batch["loss_mask"][i, src].unsqueeze(0)
            pos = torch.arange(src.numel()).unsqueeze(0)
            per_token = model(tokens, pos, None, labels=labels)
            sums.append((per_token * mask).sum())
            count += float(mask.sum())
    loss = torch.stack(sums).sum() / count
    loss.backward()
    return {"loss": loss.item(), "grads": _grads(model, 1)}


@pytest.fixture(scope="module")
def oracle() -> dict:
    return run_distributed(_documents_alone, 1)[0]


def _assert_same(result: dict, ref: dict) -> None:
    assert abs(result["loss"] - ref["loss"]) < 1e-5, (result["loss"], ref["loss"])
    for name, grad in ref["grads"].items():
        got = result["grads"][name]
        rel = ((got - grad).abs().max() / grad.abs().max().clamp(min=1e-12)).item()
        assert rel < 1e-5, f"{name}: relative grad diff {rel:.2e}"


@pytest.mark.parametrize(("world", "tp", "cp"), [(1, 1, 1), (2, 1, 2), (4, 2, 2)],
                         ids=["cp1", "cp2", "tp2xcp2"])
@pytest.mark.parametrize("reset", [False, True], ids=["global-positions", "reset-positions"])
def test_thd_model_equals_documents_run_alone(oracle: dict, world: int, tp: int, cp: int,
                                              reset: bool) -> None:
    results = run_distributed(_thd_step, world, tp, cp, reset)
    # both rows end in a document crossing the row end: 10 + 8 tokens cut
    assert results[0]["stats"]["dropped_tokens"] == 18
    _assert_same(results[0], oracle)
