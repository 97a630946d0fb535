"""Tiny LLaMA forward+backward under TP / CP / TP x CP / SP equals one process (gloo ranks).

Every run builds the same weights (use_cpu_initialization: full weights from the seeded CPU
generator, then split), feeds the same tokens, and returns the global mean loss and the full
gradients (TP shards gathered with Megatron's partition stride, CP and SP partial gradients
summed as Megatron's grad finalisation would).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from megatron_longctx.config.model import ParallelConfig
from megatron_longctx.config.presets import get_preset
from tests.distributed.spawn import run_distributed

SEQ = 64
BATCH = 2
DOCS = [[0, 20, 49], [0, 7, 40]]  # per-sample document starts (global positions)


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    data = torch.randint(0, 512, (BATCH, SEQ + 1), generator=gen)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def _full_param(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gather a TP-split gradient into the single-process layout (stride-aware)."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return grad
    group = ps.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group)
    if tp == 1:
        return grad
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    shards = [torch.empty_like(grad) for _ in range(tp)]
    dist.all_gather(shards, grad.contiguous(), group=group)
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(tp)], dim=dim)


def _step(rank: int, world: int, tp: int, cp: int, sp: bool, docs: bool,
          **overrides: object) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_longctx.model.attention import document_seq_params
    from megatron_longctx.model.build import build_model
    from megatron_longctx.parallel.context_parallel import split_batch_for_cp
    from megatron_longctx.parallel.init import initialize_model_parallel, set_seed

    parallel = ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp,
                              sequence_parallel=sp)
    initialize_model_parallel(parallel)
    set_seed(1234)
    model = build_model(replace(get_preset("tiny"), seq_length=SEQ), parallel, **overrides)
    tokens, labels = _tokens()
    batch = split_batch_for_cp({"tokens": tokens, "labels": labels}, cp,
                               ps.get_context_parallel_rank())
    packed = document_seq_params(DOCS, SEQ) if docs else None
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                      packed_seq_params=packed)
    loss = per_token.sum() / (BATCH * SEQ)
    loss.backward()

    total = loss.detach().clone()
    if cp > 1:
        dist.all_reduce(total, group=ps.get_context_parallel_group())
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.detach().clone()
        if cp > 1:
            dist.all_reduce(grad, group=ps.get_context_parallel_group())
        if sp and getattr(param, "sequence_parallel", False):
            dist.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
        grads[name] = _full_param(param, grad)
    return {"loss": total.item(), "grads": grads if rank == 0 else None,
            "per_token_shape": tuple(per_token.shape)}


@pytest.fixture(scope="module")
def reference() -> dict:
    return run_distributed(_step, 1, 1, 1, False, False)[0]


@pytest.fixture(scope="module")
def reference_docs() -> dict:
    return run_distributed(_step, 1, 1, 1, False, True)[0]


def _assert_same(result: dict, ref: dict) -> None:
    assert abs(result["loss"] - ref["loss"]) < 1e-5, (result["loss"], ref["loss"])
    assert result["grads"].keys() == ref["grads"].keys()
    for name, grad in ref["grads"].items():
        got = result["grads"][name]
        assert got.shape == grad.shape, name
        err = (got - grad).abs().max().item()
        assert err < 1e-5, f"{name}: max |grad diff| {err:.2e}"


@pytest.mark.parametrize(
    ("world", "tp", "cp", "sp"),
    [(2, 2, 1, False), (2, 1, 2, False), (4, 2, 2, False), (2, 2, 1, True)],
    ids=["tp2", "cp2", "tp2xcp2", "tp2-sp"],
)
def test_parallel_matches_single_process(reference: dict, world: int, tp: int, cp: int,
                                         sp: bool) -> None:
    results = run_distributed(_step, world, tp, cp, sp, False)
    assert all(r["per_token_shape"] == (BATCH, SEQ // cp) for r in results)
    assert len({round(r["loss"], 7) for r in results}) == 1
    _assert_same(results[0], reference)


def test_cp2_with_documents_matches_single_process(reference_docs: dict, reference: dict
                                                   ) -> None:
    assert abs(reference_docs["loss"] - reference["loss"]) > 1e-4  # masking changes the loss
    _assert_same(run_distributed(_step, 2, 1, 2, False, True)[0], reference_docs)


@pytest.mark.parametrize(
    "overrides",
    [{"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
     {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}],
    ids=["full", "selective-core-attn"],
)
def test_activation_recompute_tp2_cp2_matches(reference: dict, overrides: dict) -> None:
    _assert_same(run_distributed(_step, 4, 2, 2, True, False, **overrides)[0], reference)


def _seed_twice(rank: int, world: int) -> list[float]:
    from megatron_longctx.parallel.init import initialize_model_parallel, set_seed

    initialize_model_parallel(ParallelConfig())
    set_seed(5)
    first = torch.rand(3).tolist()
    set_seed(5)
    return [first, torch.rand(3).tolist()]


def test_seed_is_reproducible_on_cpu() -> None:
    first, second = run_distributed(_seed_twice, 1)[0]
    assert first == second
