#!/usr/bin/env python3
"""How long a save holds training: `--async-save` vs a blocking save of the same checkpoint.

The trainer (`pretrain_longctx.py`, one process, fp32 on CPU, mock data) trains a LLaMA-shaped
model of ~170M parameters (8 layers, width 1024, vocabulary 32,000) whose checkpoint, with
Adam's two moments, is 1.5 GiB: a blocking save takes seconds. Short sequences (32 tokens)
keep the steps short next to the save. Each mode runs as its own trainer process (both pay the
first-save start-up alike): 8 steps, a save after step 4 and the final (always blocking) save
after step 8; retention keeps one checkpoint. Times come from the run's own TensorBoard series
(`iteration-time`, `save-checkpoint-time` of --log-timers-to-tensorboard).

Printed per mode: the median step time without a save (steps 2-4), the time the save call held
training after step 4, steps 5-7 (during the background write in async mode), and the window =
save call + steps 5-7. Ratios async / blocking: of the save call (what a GPU run gains) and of
the window (on CPU the writer competes with the steps for the same cores and memory bandwidth,
and the pages the steps modify are copied once for the forked writer, so steps 5-7 slow down;
on GPUs training runs on the device while the writer uses host cores). With `--repeats` the
modes are interleaved and medians compared: on a shared machine the load dominates single runs.

    python benchmarks/bench_async_save.py [--layers 8] [--hidden 1024] [--seq 32]
        [--dir /tmp/bench-async-save] [--repeats 1]

Results of a run on this machine: docs/training.md ("Asynchronous saves").
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("blocking", "async")


def trainer_argv(args: argparse.Namespace, run_dir: str, mode: str) -> list[str]:
    return ["--num-layers", str(args.layers), "--hidden-size", str(args.hidden),
            "--num-attention-heads", str(args.hidden // 64),
            "--ffn-hidden-size", str(args.hidden * 11 // 4), "--seq-length", str(args.seq),
            "--max-position-embeddings", str(args.seq), "--mock-data",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "32000",
            "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "8",
            "--lr", "1e-5", "--log-interval", "1", "--transformer-impl", "local",
            "--save", f"{run_dir}/ckpt", "--save-interval", "4", "--keep-last-checkpoints", "1",
            "--tensorboard-dir", f"{run_dir}/tb", "--log-timers-to-tensorboard",
            *(["--async-save"] if mode == "async" else [])]


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_longctx.parallel.init import free_port

    run_dir = tempfile.mkdtemp(prefix=f"{mode}-", dir=args.dir)
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "WORLD_SIZE": "1",
               "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        proc = subprocess.run(
            [sys.executable, str(REPO / "pretrain_longctx.py"),
             *trainer_argv(args, run_dir, mode)],
            capture_output=True, text=True, cwd=REPO, env=env)
        if proc.returncode:
            raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        gb = sum(f.stat().st_size for f in Path(run_dir, "ckpt").rglob("*")
                 if f.is_file()) / 2**30
        acc = EventAccumulator(f"{run_dir}/tb", size_guidance={"scalars": 0})
        acc.Reload()
        steps = {e.step: e.value for e in acc.Scalars("iteration-time")}
        saves = {e.step: e.value for e in acc.Scalars("save-checkpoint-time")}
        return {"steps": steps, "saves": saves, "gb": gb}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--dir", default="/tmp/bench-async-save")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per mode, interleaved; medians are compared")
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    calls: dict[str, list[float]] = {}
    windows: dict[str, list[float]] = {}
    print(f"model: {args.layers} layers, hidden {args.hidden}, seq {args.seq}, fp32, CPU, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for _ in range(args.repeats):
        for mode in MODES:
            r = run_mode(args, mode)
            steps, save = r["steps"], r["saves"][4]
            normal = statistics.median(steps[i] for i in (2, 3, 4))
            during = [steps[i] for i in (5, 6, 7)]
            window = save + sum(during)
            calls.setdefault(mode, []).append(save)
            windows.setdefault(mode, []).append(window)
            print(f"{mode:>8}: checkpoint {r['gb']:.2f} GiB | step {normal:.2f} s | save call "
                  f"after step 4 {save:.2f} s | steps 5-7 "
                  f"{' '.join(f'{s:.2f}' for s in during)} s | window {window:.2f} s | final "
                  f"blocking save {r['saves'][8]:.2f} s", flush=True)
    med_call = {m: statistics.median(v) for m, v in calls.items()}
    med_window = {m: statistics.median(v) for m, v in windows.items()}
    print(f"save call: blocking {med_call['blocking']:.2f} s, async {med_call['async']:.2f} s, "
          f"ratio async / blocking {med_call['async'] / med_call['blocking']:.3f}")
    print(f"save call + 3 steps: blocking {med_window['blocking']:.2f} s, async "
          f"{med_window['async']:.2f} s, ratio async / blocking "
          f"{med_window['async'] / med_window['blocking']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
