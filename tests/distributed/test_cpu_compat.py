"""CPU patches: idempotent, a CPU RNG tracker with megatron's semantics, CUDA-free helpers."""

from __future__ import annotations

import pytest
import torch

from megatron_longctx.parallel.cpu_compat import PATCH_GROUPS, apply_cpu_patches
from tests.distributed.spawn import run_distributed


def test_apply_is_idempotent_and_covers_current_device() -> None:
    first = apply_cpu_patches()
    assert apply_cpu_patches() == first == sorted(PATCH_GROUPS)
    assert torch.cuda.current_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown CPU patch group 'nope'"):
        apply_cpu_patches(("nope",))


class _FakeGroup:
    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_rope_cp_slice_without_cuda() -> None:
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    emb = torch.arange(16.0).view(16, 1, 1, 1)
    out = rotary_pos_embedding.get_pos_emb_on_this_cp_rank(emb, 0, _FakeGroup(2, 1))
    assert out.flatten().tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


def _rng(rank: int, world: int) -> dict:
    from megatron.core import tensor_parallel

    from megatron_longctx.config.model import ParallelConfig
    from megatron_longctx.parallel.init import initialize_model_parallel

    initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=world))
    tensor_parallel.model_parallel_cuda_manual_seed(42)
    default_draw = torch.rand(4)
    tensor_parallel.model_parallel_cuda_manual_seed(42)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        tp_draw = torch.rand(4)
    restored = torch.equal(before, torch.get_rng_state())
    return {"default": default_draw, "tp": tp_draw, "restored": restored,
            "again": torch.rand(4), "cls": type(tracker).__name__}


def test_cpu_rng_tracker_semantics() -> None:
    r0, r1 = run_distributed(_rng, 2)
    assert r0["cls"] == "CpuRNGStatesTracker"
    # the seed wrapper seeds the CPU generator: same default stream on every rank and re-seed
    assert torch.equal(r0["default"], r1["default"])
    assert torch.equal(r0["again"], r0["default"])
    # the model-parallel stream differs per TP rank and the fork restores the default state
    assert not torch.equal(r0["tp"], r1["tp"])
    assert r0["restored"] and r1["restored"]
