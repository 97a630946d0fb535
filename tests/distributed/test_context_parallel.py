"""CP batch split: Megatron's load-balanced layout, positions, errors, and the K/V all-gather."""

from __future__ import annotations

import pytest
import torch

from megatron_longctx.parallel.context_parallel import (
    cp_chunk_ids,
    cp_token_positions,
    split_batch_for_cp,
)
from tests.distributed.spawn import run_distributed


def test_layout_keeps_chunks_r_and_mirror() -> None:
    tokens = torch.arange(16).view(1, 16).repeat(2, 1)
    parts = [split_batch_for_cp({"tokens": tokens, "labels": tokens + 100}, 2, r)
             for r in range(2)]
    # chunks of 4: rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2
    assert parts[0]["tokens"][0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert parts[1]["tokens"][0].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert parts[1]["labels"][1].tolist() == [104, 105, 106, 107, 108, 109, 110, 111]
    for part in parts:
        assert torch.equal(part["position_ids"], part["tokens"])
    assert cp_chunk_ids(4, 1) == (1, 6)


def test_positions_cover_sequence_once_and_balance_causal_work() -> None:
    cp, seq = 4, 64
    positions = [cp_token_positions(seq, cp, r) for r in range(cp)]
    assert sorted(torch.cat(positions).tolist()) == list(range(seq))
    work = [int((p + 1).sum()) for p in positions]  # keys each query attends to
    assert len(set(work)) == 1


def test_mask_and_passthrough_fields() -> None:
    seq = 8
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)
    out = split_batch_for_cp({"tokens": torch.arange(seq).view(1, seq), "attention_mask": mask,
                              "position_ids": torch.arange(seq).view(1, seq) * 10,
                              "num_docs": torch.tensor([3]), "extra": None}, 2, 1)
    assert out["attention_mask"].shape == (1, 1, 4, seq)
    assert torch.equal(out["attention_mask"][0, 0], mask[0, 0, 2:6])
    assert out["position_ids"][0].tolist() == [20, 30, 40, 50]
    assert out["num_docs"].tolist() == [3] and out["extra"] is None


def test_cp1_is_identity_and_bad_length_names_flags() -> None:
    tokens = torch.arange(10).view(1, 10)
    assert split_batch_for_cp({"tokens": tokens}, 1, 0)["tokens"] is tokens
    with pytest.raises(ValueError, match=r"--seq-length \(10\).*--context-parallel-size \(4\)"):
        split_batch_for_cp({"tokens": tokens}, 4, 0)
    with pytest.raises(ValueError, match="cp_rank 2 outside"):
        cp_token_positions(16, 2, 2)


def _gather(rank: int, world: int) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_longctx.config.model import ParallelConfig
    from megatron_longctx.model.attention import gather_cp
    from megatron_longctx.parallel.init import initialize_model_parallel

    initialize_model_parallel(ParallelConfig(context_parallel_size=world))
    full = torch.arange(16.0).view(16, 1)
    local = split_batch_for_cp({"x": full.view(1, 16)}, world, rank)["x"].view(-1, 1)
    local.requires_grad_(True)
    gathered = gather_cp(local, ps.get_context_parallel_group())
    (gathered * torch.arange(16.0).view(16, 1)).sum().backward()
    return {"gathered": gathered.detach().flatten().tolist(),
            "grad": local.grad.flatten().tolist(), "local": local.detach().flatten().tolist()}


def test_gather_cp_restores_global_order_and_routes_grads() -> None:
    results = run_distributed(_gather, 2)
    for r in results:
        assert r["gathered"] == list(range(16))
        # d/dx of sum(x_j * j) summed over both ranks' identical objectives = 2 * position
        assert r["grad"] == [2 * p for p in r["local"]]
