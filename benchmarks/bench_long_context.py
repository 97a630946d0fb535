#!/usr/bin/env python3
"""One training step at long sequence lengths: megatron's stock loss path vs the chunked one.

Tiny LLaMA (the `tiny` preset: 2 layers, width 64) with LLaMA-3's vocabulary (128,256 rows),
mock data, fp32 on CPU, one sequence per step, run by the real trainer (`pretrain_longctx.py`'s
`training.entry.main`). Each configuration runs in its own subprocess(es), so the peak RSS
(`ru_maxrss`) is that configuration's alone; `--cross-entropy-impl megatron` and `chunked`
run side by side in the same invocation at each length. Prints per length: peak RSS per rank
and step time for both, the stock / chunked memory ratio and the chunked / stock time ratio,
and how each grows with length. Step time is the fastest of the `--iters` steps (the first
step also faults in every fresh page). `--cp2-lengths` adds runs with 2 context-parallel ranks
(131,072 tokens: 65,536 per rank); a stock run whose estimated peak (from the measured growth)
exceeds `--max-gb` is skipped and reported as such rather than started.

    flock /tmp/longctx-bigmem.lock python benchmarks/bench_long_context.py \
        [--lengths 4096,8192,16384,32768] [--cp2-lengths 131072] [--vocab 128256]
        [--iters 2] [--max-gb 20] [--impls megatron,chunked] [--json out.json]
        [--data-args="--data-path P --tokenizer-type HuggingFaceTokenizer --tokenizer-model T"]
        [--extra=--reset-attention-mask]

`--data-args` replaces the mock data (real document boundaries for `--reset-attention-mask`);
flag values that start with `--` need the `--opt=value` spelling.

The 32K stock run needs ~18 GB: run the whole benchmark under the flock above on a shared
machine. Results of a run on this machine: docs/long-context.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMPLS = ("megatron", "chunked")
STEP_RE = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+) .*lm loss: ([0-9.E+-]+)")


def trainer_argv(seq: int, vocab: int, impl: str, iters: int, cp: int,
                 extra: list[str], data: list[str] | None = None) -> list[str]:
    """pretrain_longctx.py flags of one benchmark configuration (`data`: data and tokenizer
    flags replacing mock data with a NullTokenizer of `vocab` tokens)."""
    data = data or ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size",
                    str(vocab)]
    return ["--model-preset", "tiny", "--seq-length", str(seq), *data,
            "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", str(iters),
            "--lr", "1e-5", "--log-interval", "1", "--seed", "1234",
            "--context-parallel-size", str(cp), "--cross-entropy-impl", impl, *extra]


def worker(argv: list[str]) -> int:
    """Run the trainer in this process, then print one JSON line with this rank's peak RSS."""
    from megatron_longctx.tool_env import quiet_tool_warnings

    quiet_tool_warnings()
    from megatron_longctx.training.entry import main

    code = main(argv)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print("BENCH " + json.dumps({"rank": int(os.environ.get("RANK", 0)), "code": code,
                                 "peak_gb": peak_gb}), flush=True)
    return code


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_config(argv: list[str], world: int, timeout: float) -> dict:
    """Launch `world` worker ranks; step times and loss from the console, peak per rank."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS=str(
                       max(1, (os.cpu_count() or 1) // world)))
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--", *argv], env=env, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    start = time.time()
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=max(1.0, timeout - (time.time() - start)))[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            return {"error": f"timeout after {timeout:.0f} s"}
    reports = [json.loads(line[6:]) for out in outputs for line in out.splitlines()
               if line.startswith("BENCH ")]
    # The console line comes from the last rank (megatron logs on the last pipeline rank).
    steps = [(float(t) / 1000, float(loss)) for out in outputs
             for t, loss in STEP_RE.findall(out)]
    if len(reports) != world or any(r["code"] for r in reports) or not steps:
        tail = " / ".join(outputs[-1].splitlines()[-3:])
        return {"error": f"exit codes {[p.returncode for p in procs]}: {tail}"}
    return {"step_s": min(t for t, _ in steps), "loss": steps[0][1],
            "peak_gb": max(r["peak_gb"] for r in reports),
            "peaks_gb": [round(r["peak_gb"], 2) for r in reports]}


def _estimate_gb(results: dict, impl: str, cp: int, seq: int) -> float | None:
    """Linear extrapolation in tokens per rank from the two largest measured lengths."""
    points = sorted((s // c, r["peak_gb"]) for (i, c, s), r in results.items()
                    if i == impl and "peak_gb" in r)
    if len(points) < 2:
        return None
    (x0, y0), (x1, y1) = points[-2:]
    return y1 + (y1 - y0) / (x1 - x0) * (seq // cp - x1)


def _print_row(seq: int, cp: int, stock: dict, ours: dict) -> None:
    def cell(r: dict) -> str:
        if "peak_gb" not in r:
            return f"{r.get('skipped') or r.get('error', '?')[:40]:>24s}"
        return f"{r['peak_gb']:8.2f} GB {r['step_s']:9.2f} s "

    ratio = (f"{stock['peak_gb'] / ours['peak_gb']:8.2f}x {ours['step_s'] / stock['step_s']:8.2f}x"
             if "peak_gb" in stock and "peak_gb" in ours else f"{'-':>9s} {'-':>9s}")
    print(f"{seq:>8d} {cp:>3d} | {cell(stock)} | {cell(ours)} | {ratio}", flush=True)


def _print_growth(results: dict) -> None:
    print("\nGrowth of peak RSS per rank (GB per 1K tokens per rank, between measured lengths):")
    for impl in IMPLS:
        points = sorted((s // c, r["peak_gb"]) for (i, c, s), r in results.items()
                        if i == impl and "peak_gb" in r)
        slopes = [f"{x0 // 1024}K->{x1 // 1024}K: {(y1 - y0) / (x1 - x0) * 1024:.3f}"
                  for (x0, y0), (x1, y1) in zip(points, points[1:])]
        print(f"  {impl:9s} " + ", ".join(slopes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--cp2-lengths", default="131072")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--max-gb", type=float, default=20.0,
                        help="skip a run whose extrapolated peak per rank is above this")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--extra", default="", help="more pretrain flags, space separated")
    parser.add_argument("--data-args", default="",
                        help="data + tokenizer flags instead of mock data (e.g. '--data-path P "
                             "--tokenizer-type HuggingFaceTokenizer --tokenizer-model T')")
    parser.add_argument("--impls", default=",".join(IMPLS), help="which loss paths to run")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args(argv)
    plan = ([(1, int(s)) for s in args.lengths.split(",") if s]
            + [(2, int(s)) for s in args.cp2_lengths.split(",") if s])
    results: dict[tuple[str, int, int], dict] = {}
    print(f"vocab {args.vocab}, tiny preset, fp32, CPU; peak RSS per rank, fastest step\n"
          f"{'tokens':>8s} {'CP':>3s} | {'stock peak':>11s} {'step':>10s} | "
          f"{'chunked peak':>11s} {'step':>10s} | {'mem ratio':>9s} {'time ratio':>9s}")
    impls = args.impls.split(",")
    for cp, seq in plan:
        for impl in IMPLS:
            if impl not in impls:
                results[(impl, cp, seq)] = {"skipped": "not in --impls"}
                continue
            estimate = _estimate_gb(results, impl, cp, seq)
            if estimate is not None and estimate > args.max_gb:
                results[(impl, cp, seq)] = {"skipped": f"est. {estimate:.0f} GB > --max-gb"}
                continue
            results[(impl, cp, seq)] = run_config(
                trainer_argv(seq, args.vocab, impl, args.iters, cp, args.extra.split(),
                             args.data_args.split() or None), cp, args.timeout)
        _print_row(seq, cp, results[("megatron", cp, seq)], results[("chunked", cp, seq)])
    _print_growth(results)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {f"{i}/cp{c}/{s}": r for (i, c, s), r in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:]))
    sys.exit(main())
