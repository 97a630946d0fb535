"""Checkpoint resume (bitwise on CPU), resharded resume, and the loop's stop conditions."""

from __future__ import annotations

import math
import os

import pytest
import torch

from megatron_longctx.checkpoint import meta as checkpoint_meta
from megatron_longctx.config.training import EXIT_NAN, EXIT_REQUEUE
from tests.distributed.spawn import run_distributed
from tests.distributed.trainer_harness import (
    _train_rank,
    assert_moved_only_by_updates,
    final_weights,
    make_config,
    max_bf16_excess,
    max_weight_diff,
    train,
)


@pytest.fixture(scope="module")
def straight(init_ckpt, tmp_path_factory):
    """4 uninterrupted iterations, one process."""
    save = str(tmp_path_factory.mktemp("straight"))
    result = train(make_config(load=init_ckpt, save=save, iters=4), 1)
    return result, final_weights(save)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("layout,world", [({}, 1), ({"distopt": True}, 2)],
                         ids=["single", "dp2-distopt"])
def test_resume_is_bitwise(layout, world, dtype, init_ckpt, tmp_path):
    """Also in bf16: the fp32 main parameters and Adam state come back from the checkpoint."""
    save = str(tmp_path / "ckpt")
    ref = train(make_config(load=init_ckpt, save=str(tmp_path / "ref"), iters=4, dtype=dtype,
                            **layout), world)
    first = train(make_config(load=init_ckpt, save=save, iters=4, exit_interval=2, dtype=dtype,
                              **layout), world)
    assert first["iteration"] == 2 and first["reason"] == "exit-interval"
    assert checkpoint_meta.latest_iteration(save) == 2
    # --load of the run's own directory resumes (iteration 2, optimizer, scheduler, data).
    second = train(make_config(load=save, save=save, iters=4, dtype=dtype, **layout), world)
    assert second["iteration"] == 4
    assert first["losses"] + second["losses"] == ref["losses"]  # exact floats
    resumed, uninterrupted = final_weights(save), final_weights(str(tmp_path / "ref"))
    assert max_weight_diff(resumed, uninterrupted) == 0.0


@pytest.fixture(scope="module")
def straight_bf16(init_ckpt, tmp_path_factory):
    """4 uninterrupted iterations, one process, bf16."""
    save = str(tmp_path_factory.mktemp("straight-bf16"))
    result = train(make_config(load=init_ckpt, save=save, iters=4, dtype="bf16"), 1)
    return result, final_weights(save)


RESHARD_CASES = [
    ({"distopt": True}, {"tp": 2, "distopt": True}),
    ({"tp": 2}, {"pp": 2}),
    ({"pp": 2}, {"cp": 2}),
]
RESHARD_IDS = ["dp2-distopt->tp2", "tp2->pp2", "pp2->cp2"]


@pytest.mark.parametrize("save_layout,load_layout", RESHARD_CASES, ids=RESHARD_IDS)
def test_resharded_resume(save_layout, load_layout, init_ckpt, straight, tmp_path):
    save = str(tmp_path / "ckpt")
    first = train(make_config(load=init_ckpt, save=save, iters=4, exit_interval=2,
                              **save_layout), 2)
    second = train(make_config(load=save, save=save, iters=4, **load_layout), 2)
    ref_result, ref_weights = straight
    losses = first["losses"] + second["losses"]
    assert max(abs(a - b) for a, b in zip(losses, ref_result["losses"])) < 1e-5
    assert max_weight_diff(final_weights(save), ref_weights) < 1e-5


@pytest.mark.parametrize("save_layout,load_layout", RESHARD_CASES, ids=RESHARD_IDS)
def test_resharded_resume_bf16(save_layout, load_layout, init_ckpt, straight_bf16, tmp_path):
    """bf16: tolerances of test_trainer_parallel.py (losses 5e-4; weights 2 bf16 ulps plus
    2 lr per step; measured: 4e-4 beyond the ulps for tp2->pp2)."""
    save = str(tmp_path / "ckpt")
    first = train(make_config(load=init_ckpt, save=save, iters=4, exit_interval=2,
                              dtype="bf16", **save_layout), 2)
    second = train(make_config(load=save, save=save, iters=4, dtype="bf16", **load_layout), 2)
    ref_result, ref_weights = straight_bf16
    losses = first["losses"] + second["losses"]
    assert max(abs(a - b) for a, b in zip(losses, ref_result["losses"])) < 5e-4
    excess = max_bf16_excess(final_weights(save), ref_weights)
    print("[bf16] losses", losses, ref_result["losses"], "excess", excess)
    assert excess <= 2 * 1e-4 * 4


@pytest.mark.parametrize("mode,layout,world", [
    ({"no_load_optim": True}, {}, 1),
    ({"finetune": True}, {"distopt": True}, 2),
], ids=["no-load-optim", "finetune-distopt"])
def test_bf16_weights_only_load_keeps_checkpoint_weights(mode, layout, world, init_ckpt,
                                                         tmp_path):
    """--no-load-optim / --finetune from a full bf16 checkpoint: the fresh optimizer's fp32
    main parameters are refreshed from the loaded weights, so the next steps move
    the weights only by their updates."""
    first = str(tmp_path / "first")
    train(make_config(load=init_ckpt, save=first, iters=2, dtype="bf16", **layout), world)
    lr, iters = 1e-5, 1
    second = str(tmp_path / "second")
    result = train(make_config(load=first, save=second, iters=3 if "no_load_optim" in mode
                               else iters, lr=lr, dtype="bf16", **mode, **layout), world)
    assert result["exit_code"] == 0 and len(result["losses"]) == iters
    assert assert_moved_only_by_updates(final_weights(first), final_weights(second),
                                        iters=iters, lr=lr, dtype="bf16") > 0.0


def test_optimizer_type_change_is_refused(init_ckpt, tmp_path):
    save = str(tmp_path / "ckpt")
    train(make_config(load=init_ckpt, save=save, iters=4, exit_interval=2, distopt=True), 2)
    with pytest.raises(RuntimeError, match="--use-distributed-optimizer"):
        train(make_config(load=save, save=save, iters=4, tp=2), 2)


def _nan_rank(rank: int, world: int, cfg, bad_iteration: int):
    from megatron_longctx.training import step

    original = step._loss_func
    calls = {"n": 0}

    def poisoned(loss_mask, dataset_id, num_domains, output_tensor):
        calls["n"] += 1
        loss, count, report = original(loss_mask, dataset_id, num_domains, output_tensor)
        per_step = cfg.num_microbatches(world)
        if (calls["n"] - 1) // per_step + 1 == bad_iteration:
            loss = loss * float("nan")
            report["lm loss"] = report["lm loss"] * torch.tensor([float("nan"), 1.0],
                                                                 dtype=torch.float64)
        return loss, count, report

    step._loss_func = poisoned
    return _train_rank(rank, world, cfg)


def test_nan_loss_stop_and_skip(init_ckpt, tmp_path):
    save = str(tmp_path / "stop")
    stopped = run_distributed(_nan_rank, 2, make_config(load=init_ckpt, save=save, iters=4,
                                                        save_interval=1, tp=2), 2)
    assert all(r["exit_code"] == EXIT_NAN for r in stopped)
    assert stopped[0]["iteration"] == 1
    # The checkpoint of iteration 1 stays the latest: the damaged step is never saved.
    assert checkpoint_meta.latest_iteration(save) == 1

    skipped = run_distributed(_nan_rank, 2, make_config(load=init_ckpt, iters=4,
                                                        on_nan_loss="skip", distopt=True), 2)
    r = skipped[-1]
    assert r["exit_code"] == 0 and r["iteration"] == 4
    assert math.isnan(r["losses"][1]) and all(math.isfinite(x) for x in r["losses"][2:])
    assert r["grad_norms"][1] is None


def test_exit_duration_saves_and_requests_requeue(init_ckpt, tmp_path):
    save = str(tmp_path / "ckpt")
    result = train(make_config(load=init_ckpt, save=save, iters=5,
                               exit_duration_in_mins=1e-9), 2)
    assert result["exit_code"] == EXIT_REQUEUE and result["reason"] == "exit-duration"
    assert result["iteration"] == 1
    assert checkpoint_meta.latest_iteration(save) == 1


def _signal_rank(rank: int, world: int, cfg):
    import signal

    from megatron_longctx.training import step

    original = step.train_step

    def signalled_step(*args, **kwargs):
        out = original(*args, **kwargs)
        if rank == 1:  # only one rank gets the signal; all must stop together
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    from megatron_longctx.training import loop

    loop.train_step = signalled_step
    return _train_rank(rank, world, cfg)


def test_signal_saves_and_exits_for_requeue(init_ckpt, tmp_path):
    save = str(tmp_path / "ckpt")
    cfg = make_config(load=init_ckpt, save=save, iters=5, exit_signal_handler=True)
    results = run_distributed(_signal_rank, 2, cfg)
    assert [r["exit_code"] for r in results] == [EXIT_REQUEUE, EXIT_REQUEUE]
    assert results[0]["iteration"] == 1 and results[0]["reason"] == "signal"
    assert checkpoint_meta.latest_iteration(save) == 1
    meta = checkpoint_meta.read_meta(checkpoint_meta.iter_dir(save, 1))
    assert meta["has_optimizer"] and meta["saved_with"]["world_size"] == 2


def test_torn_save_is_not_loaded(init_ckpt, tmp_path):
    """An iteration directory without the marker update (killed mid-save) is ignored."""
    save = str(tmp_path / "ckpt")
    train(make_config(load=init_ckpt, save=save, iters=4, exit_interval=2), 1)
    torn = checkpoint_meta.iter_dir(save, 3)
    torn.mkdir()
    torch.save({"garbage": 1}, torn / "common.pt")
    assert checkpoint_meta.resolve_checkpoint(save) == checkpoint_meta.iter_dir(save, 2)
