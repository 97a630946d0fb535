"""The trainer with document masking (THD micro-batches, pads and real EOD boundaries of the
mock data) under PP2, DP2 and TP2 x CP2 equals one process; `--calculate-per-token-loss` makes
the loss and gradients independent of gradient accumulation and the DP layout, while
Megatron-LM's default averaging (`--no-calculate-per-token-loss`) does not."""

from __future__ import annotations

import math

import pytest

from tests.distributed.trainer_harness import (
    BF16_LOSS_TOL,
    BF16_WEIGHT_ATOL,
    TOL,
    final_weights,
    make_config,
    max_bf16_excess,
    max_weight_diff,
    train,
)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def dtype(request):
    return request.param


@pytest.fixture(scope="module")
def reference(init_ckpt, dtype, tmp_path_factory):
    save = str(tmp_path_factory.mktemp(f"docs-{dtype}"))
    result = train(make_config(load=init_ckpt, save=save, masking=True, dtype=dtype), 1)
    return result, final_weights(save)


@pytest.mark.parametrize("layout,world", [
    (dict(pp=2, mbs=1), 2),
    (dict(mbs=1), 2),
    (dict(tp=2, cp=2), 4),
], ids=["pp2", "dp2", "tp2xcp2"])
def test_masked_layout_matches_one_process(layout, world, dtype, init_ckpt, reference,
                                           tmp_path):
    save = str(tmp_path / "ckpt")
    result = train(make_config(load=init_ckpt, save=save, masking=True, dtype=dtype,
                               **layout), world)
    ref, ref_weights = reference
    assert result["exit_code"] == 0 and all(math.isfinite(x) for x in result["losses"])
    diffs = [abs(a - b) for a, b in zip(result["losses"], ref["losses"])]
    weights = final_weights(save)
    if dtype == "fp32":
        assert max(diffs) < TOL, (result["losses"], ref["losses"])
        assert max_weight_diff(weights, ref_weights) < TOL
    else:
        assert max(diffs) < BF16_LOSS_TOL, (result["losses"], ref["losses"])
        assert max_bf16_excess(weights, ref_weights) <= BF16_WEIGHT_ATOL


def _run(init_ckpt, tmp_path, name, world, mbs, **training):
    save = str(tmp_path / name)
    cfg = make_config(load=init_ckpt, save=save, masking=True, eod_mask_loss=True, mbs=mbs,
                      gbs=8, iters=2, **training)
    return train(cfg, world), final_weights(save)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_per_token_loss_independent_of_accumulation_and_dp(init_ckpt, tmp_path):
    """Global batch 8 as 8 micro-batches, as 4 on each of DP2, and as one micro-batch of 8."""
    runs = {name: _run(init_ckpt, tmp_path, name, world, mbs)
            for name, world, mbs in (("8x1", 1, 1), ("dp2x4", 2, 1), ("1x8", 1, 8))}
    (ref, ref_w) = runs["1x8"]
    for name, (result, weights) in runs.items():
        for got, want in zip(result["losses"], ref["losses"]):
            assert _rel(got, want) < 1e-6, (name, result["losses"], ref["losses"])
        for got, want in zip(result["grad_norms"], ref["grad_norms"]):
            assert _rel(got, want) < 1e-6, (name, result["grad_norms"], ref["grad_norms"])
        assert max_weight_diff(weights, ref_w) < TOL, name


def test_megatron_default_averaging_depends_on_accumulation(init_ckpt, tmp_path):
    """Without the flag each micro-batch's mean is averaged: micro-batches with different
    numbers of loss tokens (pads, EODs) weigh their tokens differently, so the gradient of 8
    micro-batches differs from one micro-batch of 8 (the logged loss stays per token)."""
    acc, _ = _run(init_ckpt, tmp_path, "acc", 1, 1, calculate_per_token_loss=False)
    one, _ = _run(init_ckpt, tmp_path, "one", 1, 8, calculate_per_token_loss=False)
    assert _rel(acc["losses"][0], one["losses"][0]) < 1e-6  # same weights, same logged loss
    assert _rel(acc["grad_norms"][0], one["grad_norms"][0]) > 1e-4
