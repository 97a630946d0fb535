"""Flags of long runs (async saves, retention, logs, W&B, profiler, GC, timeout): Megatron-LM's
names and defaults, and validation that names the flag."""

from __future__ import annotations

import pytest

from megatron_longctx.config.training import build_pretrain_parser, config_from_args

BASE = ["--model-preset", "tiny", "--train-iters", "2", "--mock-data", "--tokenizer-type",
        "NullTokenizer", "--vocab-size", "512"]


def parse(*flags: str):
    return config_from_args(build_pretrain_parser().parse_args([*BASE, *flags]))


def test_megatron_names_and_defaults():
    cfg = parse("--save", "/tmp/x", "--async-save", "--keep-last-checkpoints", "2",
                "--keep-checkpoints-every", "10", "--log-throughput",
                "--log-memory-to-tensorboard", "--log-timers-to-tensorboard",
                "--log-params-norm", "--log-num-zeros-in-grad", "--wandb-project", "p",
                "--wandb-exp-name", "e", "--wandb-save-dir", "/tmp/w", "--wandb-entity", "t",
                "--profile", "--use-pytorch-profiler", "--profile-step-start", "3",
                "--profile-step-end", "5", "--profile-ranks", "0", "1", "--manual-gc",
                "--manual-gc-interval", "50", "--no-manual-gc-eval",
                "--distributed-timeout-minutes", "60", "--tensorboard-dir", "/tmp/tb")
    ck, lg, tr = cfg.checkpoint, cfg.logging, cfg.training
    assert (ck.async_save, ck.keep_last_checkpoints, ck.keep_checkpoints_every) == (True, 2, 10)
    assert (lg.wandb_project, lg.wandb_exp_name, lg.wandb_save_dir, lg.wandb_entity) == \
        ("p", "e", "/tmp/w", "t")
    assert (lg.profile_step_start, lg.profile_step_end, lg.profile_ranks) == (3, 5, [0, 1])
    assert (tr.manual_gc, tr.manual_gc_interval, tr.manual_gc_eval) == (True, 50, False)
    assert tr.distributed_timeout_minutes == 60
    cfg.validate(1)
    plain = parse()
    # Megatron-LM's defaults: profile steps 10..12 on rank 0, no manual GC.
    assert (plain.logging.profile_step_start, plain.logging.profile_step_end,
            plain.logging.profile_ranks) == (10, 12, [0])
    assert not plain.training.manual_gc and plain.training.manual_gc_eval
    assert not plain.checkpoint.async_save


@pytest.mark.parametrize("flags,named", [
    (["--async-save"], "--async-save needs --save"),
    (["--save", "/tmp/x", "--keep-checkpoints-every", "3"], "--keep-checkpoints-every needs"),
    (["--save", "/tmp/x", "--keep-last-checkpoints", "0"], "--keep-last-checkpoints must"),
    (["--use-pytorch-profiler"], "--use-pytorch-profiler needs --profile"),
    (["--profile", "--profile-step-start", "5", "--profile-step-end", "5"],
     "--profile-step-start"),
    (["--profile", "--use-pytorch-profiler"], "needs --tensorboard-dir"),
    (["--manual-gc-interval", "-1"], "--manual-gc-interval"),
    (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes"),
])
def test_validation_names_the_flag(flags, named):
    with pytest.raises(ValueError, match=named):
        parse(*flags).validate(1)
