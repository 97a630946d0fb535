#!/usr/bin/env python3
"""A stand-in for pretrain_longctx.py with the same process contract, for launch-script tests.

examples/train_128k.sh is tested against the real trainer when it exists; this stub lets the
script's own logic (rendezvous variables, signal forwarding, exit code 75 -> requeue -> resume
from --save) be tested now and in milliseconds per step. It honours, like the trainer:

* ranks from SLURM_PROCID / SLURM_NTASKS, rendezvous at MASTER_ADDR:MASTER_PORT (rank 0
  listens, the others connect: a wrong address fails the job);
* `--load DIR` resumes from DIR/latest_checkpointed_iteration.txt; `--save DIR` writes
  DIR/iter_0000010/ then latest_checkpointed_iteration.txt once every rank's part exists;
  `--save-interval`, `--train-iters`, `--log-interval`;
* `--exit-signal-handler`: SIGTERM or SIGUSR1 -> finish the step, save, exit 75; also 75 once
  `--exit-duration-in-mins` elapsed; 0 after the last iteration; the stop decision is agreed
  by all ranks every step (`agree`), so every rank saves the same iteration; a signal that
  arrived while starting (before the first step) exits 75 without saving (training/signals.py:
  nothing new to save, the loaded checkpoint stays the latest);
* rank 0 prints ` iteration N/ M | lm loss: X |` lines; the "loss" is a deterministic
  recurrence carried in the checkpoint, so a resumed run prints the same numbers as an
  uninterrupted one only if it resumed from the right state.

Each rank records its argv and rendezvous environment in $FAKE_TRAINER_RECORD_DIR (if set).
FAKE_STEP_SECONDS sets the time per step (default 0.05).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

EXIT_RESUMABLE = 75


def rendezvous(rank: int, world: int, addr: str, port: int,
               timeout: float = 60) -> list[socket.socket]:
    """Connect every rank to rank 0; the sockets stay open for `agree` (rank 0 gets one per
    peer, the others one to rank 0)."""
    deadline = time.monotonic() + timeout
    if rank == 0:
        with socket.create_server(("", port), reuse_port=False) as server:
            server.settimeout(timeout)
            peers = [server.accept()[0] for _ in range(world - 1)]
        for peer in peers:
            peer.settimeout(timeout)
            peer.sendall(b"go")
        return peers
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        conn.settimeout(timeout)
        if conn.recv(2) == b"go":
            return [conn]
        conn.close()


def agree(links: list[socket.socket], rank: int, flag: bool) -> bool:
    """OR of every rank's flag, the same on all ranks (the trainer's per-step all-reduce of its
    stop flags). Without it, ranks that see a signal at different steps save different
    iterations and wait for each other's parts forever."""
    if rank == 0:
        flags = [flag] + [link.recv(1) == b"1" for link in links]
        verdict = b"1" if any(flags) else b"0"
        for link in links:
            link.sendall(verdict)
        return verdict == b"1"
    links[0].sendall(b"1" if flag else b"0")
    return links[0].recv(1) == b"1"


def save(save_dir: Path, iteration: int, rank: int, world: int, state: dict) -> None:
    it_dir = save_dir / f"iter_{iteration:07d}"
    it_dir.mkdir(parents=True, exist_ok=True)
    part = it_dir / f"rank_{rank:05d}.json"
    part.with_suffix(".tmp").write_text(json.dumps(state))
    part.with_suffix(".tmp").rename(part)
    latest = save_dir / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 60
    if rank == 0:
        while len(list(it_dir.glob("rank_*.json"))) < world:
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every rank saved {it_dir}")
            time.sleep(0.02)
        tmp = latest.with_suffix(".tmp")
        tmp.write_text(str(iteration))
        tmp.rename(latest)
    else:  # a barrier: exit only after the save is complete
        while not (latest.exists() and latest.read_text().strip() == str(iteration)):
            if time.monotonic() > deadline:
                raise TimeoutError("rank 0 did not finish the save")
            time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save", type=Path)
    parser.add_argument("--load", type=Path)
    parser.add_argument("--train-iters", type=int, required=True)
    parser.add_argument("--save-interval", type=int, default=0)
    parser.add_argument("--log-interval", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--exit-signal-handler", action="store_true")
    parser.add_argument("--exit-duration-in-mins", type=float)
    args, _unknown = parser.parse_known_args(argv)

    rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    record_dir = os.environ.get("FAKE_TRAINER_RECORD_DIR")
    if record_dir:
        keys = ("MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                "SLURM_RESTART_COUNT", "CUDA_DEVICE_MAX_CONNECTIONS", "CUDA_VISIBLE_DEVICES",
                "OMP_NUM_THREADS")
        name = (f"job{os.environ.get('SLURM_JOB_ID')}-attempt"
                f"{os.environ.get('SLURM_RESTART_COUNT', '0')}-rank{rank}.json")
        Path(record_dir).mkdir(parents=True, exist_ok=True)
        (Path(record_dir) / name).write_text(json.dumps(
            {"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}))

    stop: list[int] = []
    if args.exit_signal_handler:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda signum, _frame: stop.append(signum))
    links = rendezvous(rank, world, addr, port)

    start_iter, state = 0, {"loss": 10.0}
    if args.load and (args.load / "latest_checkpointed_iteration.txt").exists():
        start_iter = int((args.load / "latest_checkpointed_iteration.txt").read_text())
        state = json.loads((args.load / f"iter_{start_iter:07d}" /
                            f"rank_{rank:05d}.json").read_text())
        if rank == 0:
            print(f"resumed from {args.load} at iteration {start_iter}", flush=True)
    step_seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0.05"))
    if agree(links, rank, bool(stop)):
        if rank == 0:
            print(f"exiting before the first step ({'signal ' + str(stop[0]) if stop else 'a peer'}"
                  "), nothing to save", flush=True)
        return EXIT_RESUMABLE
    started = time.monotonic()
    for iteration in range(start_iter + 1, args.train_iters + 1):
        time.sleep(step_seconds)
        state["loss"] = 0.9 * state["loss"] + 0.5 * (1 + math.sin(args.seed + iteration))
        if rank == 0 and iteration % args.log_interval == 0:
            print(f" iteration {iteration:8d}/{args.train_iters:8d} | "
                  f"lm loss: {state['loss']:.6E} |", flush=True)
        elapsed_mins = (time.monotonic() - started) / 60
        timed_out = args.exit_duration_in_mins is not None and \
            elapsed_mins > args.exit_duration_in_mins
        if agree(links, rank, bool(stop) or timed_out):
            why = f"signal {stop[0]}" if stop else "exit duration" if timed_out else "a peer"
            if args.save:
                save(args.save, iteration, rank, world, state)
            if rank == 0:
                print(f"exiting after iteration {iteration} ({why}), checkpoint saved",
                      flush=True)
            return EXIT_RESUMABLE
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save(args.save, iteration, rank, world, state)
    if args.save and args.train_iters > start_iter and \
            not (args.save_interval and args.train_iters % args.save_interval == 0):
        save(args.save, args.train_iters, rank, world, state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
