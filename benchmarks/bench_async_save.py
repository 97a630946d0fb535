#!/usr/bin/env python3
"""How long a save stops training: `--async-save` vs a blocking save of the same checkpoint.

The real trainer (`training.loop.pretrain`, one process, fp32 on CPU, mock data) trains a
LLaMA-shaped model of ~170M parameters (8 layers, width 1024, vocabulary 32,000) whose
checkpoint, with Adam's two moments, is 1.5 GiB: a blocking save takes seconds. Short
sequences (32 tokens) keep the steps short next to the save. Each mode runs in its own fresh
process (so both pay the first-save start-up alike): 8 steps, a save after step 4 and the final
(always blocking) save after step 8; retention keeps one checkpoint.

Printed per mode: the median step time without a save (steps 2-4), the time the save call held
training after step 4, steps 5-7 (during the background write in async mode), and the stall =
save call + steps 5-7 - 3 normal steps: the training time the save cost. The ratio is the async
stall over the blocking stall (lower is better). On CPU the writer competes with the training
steps for the same cores, so steps 5-7 are slower in async mode; on GPUs training runs on the
device while the writer uses host cores.

    python benchmarks/bench_async_save.py [--layers 8] [--hidden 1024] [--seq 32]
        [--dir /tmp/bench-async-save] [--repeats 1]

Results of a run on this machine: docs/training.md ("Asynchronous saves").
"""

from __future__ import annotations

import argparse
import json
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


def trainer_argv(args: argparse.Namespace, save: str, mode: str) -> list[str]:
    return ["--num-layers", str(args.layers), "--hidden-size", str(args.hidden),
            "--num-attention-heads", str(args.hidden // 64),
            "--ffn-hidden-size", str(args.hidden * 11 // 4), "--seq-length", str(args.seq),
            "--max-position-embeddings", str(args.seq), "--mock-data",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "32000",
            "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "8",
            "--lr", "1e-5", "--log-interval", "100", "--transformer-impl", "local",
            "--save", save, "--save-interval", "4", "--keep-last-checkpoints", "1",
            *(["--async-save"] if mode == "async" else [])]


def worker(argv: list[str]) -> int:
    """One mode in this process: train, print the step and save times as JSON."""
    import torch

    from megatron_longctx.parallel.init import free_port, initialize_distributed
    from megatron_longctx.training.entry import _resolved_config
    from megatron_longctx.training.loop import pretrain

    torch.set_num_threads(os.cpu_count() or 1)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    cfg, tokenizer = _resolved_config(argv, 1)
    initialize_distributed(cfg.parallel, seed=cfg.training.seed)
    result = pretrain(cfg, tokenizer=tokenizer)
    print("RESULT " + json.dumps({"steps": result.step_seconds,
                                  "saves": {str(k): v for k, v in result.save_seconds.items()}}),
          flush=True)
    return 0


def checkpoint_gb(save: str) -> float:
    return sum(f.stat().st_size for f in Path(save).rglob("*") if f.is_file()) / 2**30


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    save = tempfile.mkdtemp(prefix=f"{mode}-", dir=args.dir)
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", *trainer_argv(args, save, mode)],
            capture_output=True, text=True, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        if proc.returncode:
            raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        out = json.loads(line[len("RESULT "):])
        out["gb"] = checkpoint_gb(save)
        return out
    finally:
        shutil.rmtree(save, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--dir", default="/tmp/bench-async-save")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per mode, interleaved; the median stall is compared")
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    stalls = {}
    print(f"model: {args.layers} layers, hidden {args.hidden}, seq {args.seq}, fp32, CPU, "
          f"{os.cpu_count()} cores")
    for _ in range(args.repeats):  # modes interleaved: both see the same machine load
        for mode in MODES:
            r = run_mode(args, mode)
            steps, save = r["steps"], r["saves"]["4"]
            normal = statistics.median(steps[1:4])
            stall = save + sum(steps[4:7]) - 3 * normal
            stalls.setdefault(mode, []).append(stall)
            during = " ".join(f"{s:.2f}" for s in steps[4:7])
            print(f"{mode:>8}: checkpoint {r['gb']:.2f} GiB | step {normal:.2f} s | save "
                  f"call after step 4 {save:.2f} s | steps 5-7 {during} s | stall "
                  f"{stall:.2f} s | final blocking save {r['saves']['8']:.2f} s", flush=True)
    med = {mode: statistics.median(v) for mode, v in stalls.items()}
    print(f"median stall: blocking {med['blocking']:.2f} s, async {med['async']:.2f} s; "
          f"ratio async / blocking: {med['async'] / med['blocking']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
