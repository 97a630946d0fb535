"""The chunked cross-entropy against megatron's stock loss path, and the trainer's
loss independent of the layout once padded vocabulary rows are excluded.

* Model level (tiny preset, unpadded 512 vocabulary): the same GPTModel weights through both
  paths give equal per-token losses and gradients within 1e-6 relative, in one process and at
  TP2 / TP2+SP.
* Trainer level: an HF LLaMA with a 600-token vocabulary (not a multiple of 128 x TP: TP1
  pads to 640 rows, TP2 to 768) converted once; TP1, TP2, TP2+SP, PP2, CP2, DP2 and TP2xCP2
  give the same losses within 1e-5 (fp32). The stock path at TP1 vs TP2 does not (the
  defect: zero padded rows count as logit 0 in its softmax).
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
import torch

from megatron_longctx.config.model import ParallelConfig, PrecisionConfig
from megatron_longctx.config.presets import get_preset
from tests.distributed.spawn import run_distributed
from tests.distributed.test_model_parallel import _full_param
from tests.distributed.trainer_harness import convert_random_hf_tp2, make_config, train

SEQ, BATCH = 64, 2
HF_VOCAB = 600


def _step(rank: int, world: int, tp: int, sp: bool, impl: str, tied: bool = False) -> dict:
    from megatron_longctx.model.build import build_model
    from megatron_longctx.parallel.init import initialize_model_parallel, set_seed

    parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp)
    initialize_model_parallel(parallel)
    set_seed(1234)
    shape = replace(get_preset("tiny"), seq_length=SEQ,
                    untie_embeddings_and_output_weights=not tied)
    model = build_model(shape, parallel,
                        PrecisionConfig(cross_entropy_impl=impl, cross_entropy_chunk_size=24))
    gen = torch.Generator().manual_seed(7)
    data = torch.randint(0, 512, (BATCH, SEQ + 1), generator=gen)
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    per_token = model(tokens, positions, None, labels=labels)
    weights = torch.rand(BATCH, SEQ, generator=gen)  # like a loss mask / per-token scale
    (per_token * weights).sum().backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.detach().clone()
        if sp and getattr(param, "sequence_parallel", False):
            torch.distributed.all_reduce(grad, group=_tp_group())
        grads[name] = _full_param(param, grad)
    return {"losses": per_token.detach(), "grads": grads}


def _tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def stock() -> dict:
    return run_distributed(_step, 1, 1, False, "megatron")[0]


@pytest.mark.parametrize(("world", "sp"), [(1, False), (2, False), (2, True)],
                         ids=["tp1", "tp2", "tp2-sp"])
def test_chunked_equals_stock_path(stock: dict, world: int, sp: bool) -> None:
    got = run_distributed(_step, world, world, sp, "chunked")[0]
    torch.testing.assert_close(got["losses"], stock["losses"], rtol=1e-6, atol=1e-6)
    assert got["grads"].keys() == stock["grads"].keys()
    for name, grad in stock["grads"].items():
        assert _rel(got["grads"][name], grad) < 1e-6, name


def test_chunked_equals_stock_path_with_tied_embeddings() -> None:
    """The shared embedding weight gets the output layer's gradient through autograd, as in
    megatron's path (its embedding gradient adds to it)."""
    stock_tied = run_distributed(_step, 1, 1, False, "megatron", True)[0]
    got = run_distributed(_step, 1, 1, False, "chunked", True)[0]
    assert "output_layer.weight" not in got["grads"]
    torch.testing.assert_close(got["losses"], stock_tied["losses"], rtol=1e-6, atol=1e-6)
    for name, grad in stock_tied["grads"].items():
        assert _rel(got["grads"][name], grad) < 1e-6, name


@pytest.fixture(scope="module")
def converted_600(tmp_path_factory) -> str:
    """A random HF LLaMA of the harness's tiny shape with a 600-token vocabulary, converted to
    a TP2 model-only checkpoint (768 rows, 168 of them zero padding)."""
    root = tmp_path_factory.mktemp("hf600")
    return convert_random_hf_tp2(root, HF_VOCAB)


def _config(load: str, impl: str = "chunked", **layout):
    cfg = make_config(load=load, iters=2, **layout)
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, vocab_size=HF_VOCAB),
        precision=dataclasses.replace(cfg.precision, cross_entropy_impl=impl))


@pytest.fixture(scope="module")
def one_process(converted_600: str) -> list[float]:
    return train(_config(converted_600), 1)["losses"]


LAYOUTS = {
    "tp2": (2, {"tp": 2}), "tp2-sp": (2, {"tp": 2, "sp": True}), "pp2": (2, {"pp": 2}),
    "cp2": (2, {"cp": 2}), "dp2": (2, {}), "tp2xcp2": (4, {"tp": 2, "cp": 2}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_converted_model_loss_is_layout_independent(one_process: list[float],
                                                    converted_600: str, layout: str) -> None:
    world, kwargs = LAYOUTS[layout]
    losses = train(_config(converted_600, **kwargs), world)["losses"]
    assert len(losses) == len(one_process) == 2
    assert max(abs(a - b) for a, b in zip(losses, one_process)) < 1e-5, (losses, one_process)


def test_stock_path_counts_padded_rows(one_process: list[float], converted_600: str) -> None:
    """Why the chunked path is the default: the stock path's TP1 and TP2 losses differ (640 vs
    768 softmax entries), and neither is the unpadded loss."""
    tp1 = train(_config(converted_600, "megatron"), 1)["losses"]
    tp2 = train(_config(converted_600, "megatron", tp=2), 2)["losses"]
    assert abs(tp1[0] - tp2[0]) > 1e-3
    assert abs(tp1[0] - one_process[0]) > 1e-3
