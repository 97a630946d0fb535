"""--async-save: the write overlaps training, the checkpoint is the state at the save (a fork
snapshot, on CPU too), resumes are bitwise equal to a blocking save's, a kill -9 mid-write and
a signal mid-write leave a complete latest checkpoint; retention with kills during deletion.

The writer is slowed or held inside the forked writer process by patching
`FileSystemWriterAsync.write_preloaded_data` (the function each writer worker runs), so the
tests do not depend on how fast this machine writes.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from megatron_longctx.checkpoint import meta as checkpoint_meta
from megatron_longctx.checkpoint.integrity import check_checkpoint_files
from megatron_longctx.config.training import EXIT_REQUEUE
from megatron_longctx.training.checkpointing import TRASH_PREFIX, apply_retention
from tests.distributed.spawn import _child, free_port, run_distributed
from tests.distributed.trainer_harness import (
    _train_rank,
    final_weights,
    make_config,
    max_weight_diff,
    train,
)


def _hold_writer(iteration: int, until: str | None = None, seconds: float = 0.0,
                 started: str | None = None, partial: bool = False) -> None:
    """Patch the writer workers: for `iteration`'s save, touch `started`, optionally write a
    torn file first, then wait until the file `until` exists (or `seconds` pass)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    original = FileSystemWriterAsync.write_preloaded_data
    tag = f"iter_{iteration:07d}"

    def held(transform_list, local_proc_idx, write_bucket, *args, **kwargs):
        if tag in str(write_bucket[0]):
            if partial:
                Path(write_bucket[0]).write_bytes(b"\0" * 1000)
            if started:
                Path(f"{started}.{os.getpid()}.{os.getppid()}").touch()
            deadline = time.time() + seconds
            while time.time() < deadline and not (until and os.path.exists(until)):
                time.sleep(0.05)
        return original(transform_list, local_proc_idx, write_bucket, *args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(held)


def _overlap_rank(rank: int, world: int, cfg, release: str, seen: str):
    """Iteration 2's write waits until iteration 3 has trained (file `release`, touched by
    the training process); it records that it saw it."""
    from megatron_longctx.training import loop

    _hold_writer(2, until=release, seconds=60.0)
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    held = FileSystemWriterAsync.write_preloaded_data

    def noting(transform_list, local_proc_idx, write_bucket, *args, **kwargs):
        out = held(transform_list, local_proc_idx, write_bucket, *args, **kwargs)
        if "iter_0000002" in str(write_bucket[0]) and os.path.exists(release):
            Path(seen).touch()
        return out

    FileSystemWriterAsync.write_preloaded_data = staticmethod(noting)
    original = loop.train_step

    def step(*args, **kwargs):
        out = original(*args, **kwargs)
        if loop_state["n"] == 2 and rank == world - 1:
            Path(release).touch()
        loop_state["n"] += 1
        return out

    loop_state = {"n": 0}
    loop.train_step = step
    return _train_rank(rank, world, cfg)


LAYOUTS = [({}, 1), ({"tp": 2}, 2), ({"pp": 2}, 2), ({"cp": 2}, 2),
           ({"distopt": True}, 2)]
LAYOUT_IDS = ["single", "tp2", "pp2", "cp2", "dp2-distopt"]


@pytest.mark.parametrize("layout,world", LAYOUTS, ids=LAYOUT_IDS)
def test_async_save_overlaps_training_and_resumes_bitwise(layout, world, init_ckpt, tmp_path):
    blocking, asynchronous = str(tmp_path / "blocking"), str(tmp_path / "async")
    ref = train(make_config(load=init_ckpt, save=blocking, iters=4, save_interval=2,
                            **layout), world)
    release, seen = str(tmp_path / "release"), str(tmp_path / "seen")
    cfg = make_config(load=init_ckpt, save=asynchronous, iters=4, save_interval=2, **layout)
    cfg.checkpoint.async_save = True
    results = run_distributed(_overlap_rank, world, cfg, release, seen, timeout=240.0)
    # Iteration 3 trained while iteration 2's checkpoint was being written ...
    assert os.path.exists(seen)
    assert results[-1]["losses"] == ref["losses"]
    # ... and the checkpoint holds the weights of iteration 2, not later ones.
    it2 = str(checkpoint_meta.iter_dir(asynchronous, 2))
    assert max_weight_diff(final_weights(it2),
                           final_weights(str(checkpoint_meta.iter_dir(blocking, 2)))) == 0.0
    assert checkpoint_meta.latest_iteration(asynchronous) == 4
    assert checkpoint_meta.read_meta(it2)["iteration"] == 2
    # Resuming from the async checkpoint equals the uninterrupted blocking run, bitwise.
    resumed = str(tmp_path / "resumed")
    second = train(make_config(load=it2, save=resumed, iters=4, **layout), world)
    assert second["iteration"] == 4 and second["losses"] == ref["losses"][2:]
    assert max_weight_diff(final_weights(resumed), final_weights(blocking)) == 0.0


def _killed_rank(rank: int, world: int, cfg, started: str):
    _hold_writer(4, seconds=120.0, started=started, partial=True)
    return _train_rank(rank, world, cfg)


def test_kill_9_during_async_write_keeps_previous_checkpoint(init_ckpt, tmp_path):
    save = str(tmp_path / "ckpt")
    cfg = make_config(load=init_ckpt, save=save, iters=6, save_interval=2)
    cfg.checkpoint.async_save = True
    started = str(tmp_path / "writing")
    ctx = mp.get_context("fork")
    trainer = ctx.Process(target=_child, args=(_killed_rank, 0, 1, free_port(), ctx.Queue(),
                                               (cfg, started), {}))
    trainer.start()
    deadline = time.time() + 180
    while not list(tmp_path.glob("writing.*")) and time.time() < deadline:
        time.sleep(0.1)
    assert list(tmp_path.glob("writing.*")), "the writer of iteration 4 never started"
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.join()
    for marker in tmp_path.glob("writing.*"):  # the orphaned writer and its workers
        for pid in marker.name.split(".")[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    assert checkpoint_meta.latest_iteration(save) == 2
    assert checkpoint_meta.iter_dir(save, 4).is_dir()  # torn, unmarked
    check_checkpoint_files(checkpoint_meta.iter_dir(save, 2))
    resumed = train(make_config(load=save, save=save, iters=6), 1)
    ref_dir = str(tmp_path / "ref")
    ref = train(make_config(load=init_ckpt, save=ref_dir, iters=6), 1)
    assert resumed["losses"] == ref["losses"][2:]
    assert max_weight_diff(final_weights(save), final_weights(ref_dir)) == 0.0


def _signal_during_write_rank(rank: int, world: int, cfg, signum: int):
    from megatron_longctx.training import loop

    _hold_writer(2, seconds=3.0)
    original = loop.train_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3 and rank == 0:  # iteration 3, while iteration 2 is being written
            os.kill(os.getpid(), signum)
        return out

    loop.train_step = step
    return _train_rank(rank, world, cfg)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["TERM", "USR1"])
def test_signal_during_async_write_finishes_it_then_exits_75(signum, init_ckpt, tmp_path):
    save = str(tmp_path / "ckpt")
    cfg = make_config(load=init_ckpt, save=save, iters=8, save_interval=2, distopt=True,
                      exit_signal_handler=True)
    cfg.checkpoint.async_save = True
    results = run_distributed(_signal_during_write_rank, 2, cfg, int(signum), timeout=240.0)
    assert [r["exit_code"] for r in results] == [EXIT_REQUEUE, EXIT_REQUEUE]
    assert results[0]["iteration"] == 3
    assert checkpoint_meta.latest_iteration(save) == 3
    for it in (2, 3):  # the in-flight save was completed, then the exit save written
        directory = checkpoint_meta.iter_dir(save, it)
        check_checkpoint_files(directory)
        assert checkpoint_meta.read_meta(directory)["iteration"] == it


@pytest.mark.parametrize("async_save", [False, True], ids=["blocking", "async"])
def test_retention_keeps_last_two_and_multiples(async_save, init_ckpt, tmp_path):
    save = str(tmp_path / "ckpt")
    cfg = make_config(load=init_ckpt, save=save, iters=6, save_interval=1)
    cfg.checkpoint.keep_last_checkpoints = 2
    cfg.checkpoint.keep_checkpoints_every = 3
    cfg.checkpoint.async_save = async_save
    train(cfg, 1)
    assert sorted(p.name for p in Path(save).iterdir()) == [
        "iter_0000003", "iter_0000005", "iter_0000006", checkpoint_meta.LATEST_NAME]
    assert checkpoint_meta.latest_iteration(save) == 6


def _retention_killed_midway(root: str, keep: int) -> None:
    """apply_retention whose removal dies (SIGKILL) after deleting one file, checking first
    that the latest checkpoint is complete at that moment."""
    import shutil

    def dying_rmtree(path, *args, **kwargs):
        latest = checkpoint_meta.resolve_checkpoint(root)
        check_checkpoint_files(latest)
        next(p for p in Path(path).iterdir() if p.is_file()).unlink()
        os.kill(os.getpid(), signal.SIGKILL)

    shutil.rmtree = dying_rmtree
    apply_retention(root, keep)


def test_kill_during_retention_leaves_complete_checkpoints(init_ckpt, tmp_path):
    save = str(tmp_path / "ckpt")
    train(make_config(load=init_ckpt, save=save, iters=4, save_interval=1), 1)
    proc = mp.get_context("fork").Process(target=_retention_killed_midway, args=(save, 1))
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    root = Path(save)
    assert [p.name for p in root.glob(TRASH_PREFIX + "*")] == [TRASH_PREFIX + "iter_0000001"]
    for directory in root.glob("iter_*"):  # whatever carries an iter_ name is whole
        check_checkpoint_files(directory)
    assert checkpoint_meta.resolve_checkpoint(save) == checkpoint_meta.iter_dir(save, 4)
    assert apply_retention(save, 1) == [2, 3]
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004",
                                                      checkpoint_meta.LATEST_NAME]
    resumed = train(make_config(load=save, save=save, iters=5), 1)
    assert resumed["iteration"] == 5
