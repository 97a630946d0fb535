"""The fake trainer's own contract, without a cluster: a stop signal seen by one rank only
still makes every rank save the same iteration and exit 75 (the trainer agrees on its stop
flags every step; srun delivers a forwarded signal to the ranks at different steps)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.slurm.cluster import free_port

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")


def test_signal_on_one_rank_stops_all_ranks_at_the_same_iteration(tmp_path: Path) -> None:
    port, world, save = free_port(), 2, tmp_path / "ckpt"
    procs = []
    for rank in range(world):
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "FAKE_STEP_SECONDS": "0.02"}
        procs.append(subprocess.Popen(
            [sys.executable, str(FAKE_TRAINER), "--save", str(save), "--train-iters", "100000",
             "--exit-signal-handler"], env=env, stdout=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 60
    while "iteration" not in (procs[0].stdout.readline() or ""):  # rank 0 is stepping
        assert time.monotonic() < deadline and procs[0].poll() is None
    procs[1].send_signal(signal.SIGUSR1)  # only rank 1 sees it
    codes = [p.wait(timeout=60) for p in procs]
    for p in procs:
        p.stdout.close()
    assert codes == [75, 75]
    iteration = int((save / "latest_checkpointed_iteration.txt").read_text())
    parts = sorted(p.name for p in (save / f"iter_{iteration:07d}").iterdir())
    assert parts == ["rank_00000.json", "rank_00001.json"]
    assert [d.name for d in save.iterdir() if d.is_dir()] == [f"iter_{iteration:07d}"]
