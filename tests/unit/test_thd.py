"""THD packing and the per-rank split: Transformer Engine's documented index rule
(`thd_get_partitioned_indices`: of every document, rank r holds chunks r and 2*CP-1-r of 2*CP),
checked against a brute-force oracle written from that rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_longctx.parallel.thd import (
    pack_row,
    thd_pad_multiple,
    thd_partition_indices,
    thd_seq_params,
)


def _oracle(lengths: list[int], cp: int, rank: int) -> list[int]:
    """Token by token: which of the 2*CP chunks of its document a slot falls in."""
    out, start = [], 0
    for n in lengths:
        if cp == 1:  # no split
            out += list(range(start, start + n))
            start += n
            continue
        chunk = n // (2 * cp)
        first = [start + i for i in range(n) if i // chunk == rank] if chunk else []
        second = [start + i for i in range(n) if chunk and i // chunk == 2 * cp - 1 - rank]
        out += first + second
        start += n
    return out


@pytest.mark.parametrize("cp", range(1, 9))
def test_partition_matches_oracle_and_is_a_permutation(cp: int) -> None:
    rng = np.random.default_rng(cp)
    for _ in range(20):
        mult = thd_pad_multiple(cp)
        lengths = (rng.integers(1, 9, size=rng.integers(1, 7)) * mult).tolist()
        cu = np.concatenate([[0], np.cumsum(lengths)])
        parts = [thd_partition_indices(cu, cp, r) for r in range(cp)]
        for r, got in enumerate(parts):
            assert got.tolist() == _oracle(lengths, cp, r)
            assert got.numel() == cu[-1] // cp
        every = torch.cat(parts).sort().values
        assert torch.equal(every, torch.arange(int(cu[-1])))


def test_partition_refuses_unpadded_lengths() -> None:
    with pytest.raises(ValueError, match="not a multiple of 2 x CP = 4"):
        thd_partition_indices([0, 4, 10], 2, 0)


def test_pack_row_pads_each_document_and_cuts_the_row_end() -> None:
    # documents of 1, 4 (= 2*CP), 5 and a long last one that crosses the row's end, CP2
    seq = 24
    row = pack_row([0, 1, 5, 10], seq, thd_pad_multiple(2))
    assert row.cu_seqlens.tolist() == [0, 4, 8, 16, 24]
    assert row.cu_seqlens.dtype == np.int32
    assert row.index[:4].tolist() == [0, -1, -1, -1]
    assert row.index[4:8].tolist() == [1, 2, 3, 4]
    assert row.index[8:16].tolist() == [5, 6, 7, 8, 9, -1, -1, -1]
    assert row.index[16:].tolist() == list(range(10, 18))  # 6 tail tokens (18..23) cut
    assert row.pad_tokens == 6 and row.dropped_tokens == 6
    assert row.doc_positions[8:16].tolist() == list(range(8))


def test_pack_row_without_cp_is_the_identity() -> None:
    row = pack_row([0, 3, 7], 16, 1)
    assert row.index.tolist() == list(range(16))
    assert row.cu_seqlens.tolist() == [0, 3, 7, 16]
    assert row.pad_tokens == row.dropped_tokens == 0


def test_pack_row_drops_documents_pushed_past_the_end() -> None:
    row = pack_row([0, 1, 2, 3], 8, 4)  # 4 docs of 1 token (the last of 5) at CP2
    assert row.cu_seqlens.tolist() == [0, 4, 8]
    assert row.dropped_tokens == 6 and row.pad_tokens == 6


def test_thd_seq_params_are_megatron_thd() -> None:
    params = thd_seq_params(torch.tensor([0, 4, 12]), 12, False)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q_padded is params.cu_seqlens_q
    assert params.max_seqlen_q == params.max_seqlen_kv == 8


def test_rotary_table_covers_the_row_or_the_longest_document() -> None:
    """Global positions: a table over the whole packed row, which megatron's THD RoPE reads at
    each document's offset; reset positions: the longest document's, read from 0 in each."""
    from megatron_longctx.config.presets import get_preset
    from megatron_longctx.model.rotary import LongContextRotaryEmbedding

    class _Group:
        def size(self) -> int:
            return 1

    rope = LongContextRotaryEmbedding(get_preset("tiny").rope_spec(), 16, cp_group=_Group())
    cu = torch.tensor([0, 4, 12, 32])
    for reset, want in ((False, 32), (True, 20)):
        params = thd_seq_params(cu, 32, reset)
        assert rope.get_rotary_seq_len(None, None, torch.zeros(32, 1, 8), None, params) == want
        assert rope(want, packed_seq=True).shape == (want, 1, 1, 16)
