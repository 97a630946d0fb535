#!/usr/bin/env python3
"""The planner's memory estimate against the real trainer's measured peak, per configuration.

Each configuration runs `pretrain_longctx.py`'s `training.entry.main` for 2 steps in its own
processes (one per rank, gloo, CPU, the tiny presets). Step 2 (the optimizer state exists by
then) runs under `torch.distributed._tools.mem_tracker.MemTracker`, which counts every live
tensor by category: parameters, gradients (megatron's DDP gradient buffers, registered as such),
optimizer state (Adam moments and steps, fp32 main parameters) and activations / temporaries.
Printed per configuration, for the most loaded rank, measured vs estimated
(`megatron_longctx.plan.memory.estimate_memory`, no allocator margin on CPU):

* weights, gradients, optimizer: bytes, exact match expected;
* activations: the peak of everything else during the step (MemTracker's peak snapshot);
* total: MemTracker's peak (live tensor bytes, the allocator's view) and, for reference, the
  rise of the process's peak RSS during the step (VmHWM reset through /proc/self/clear_refs;
  MALLOC_MMAP_THRESHOLD_ makes large frees return to the OS so RSS follows live tensors).

    python benchmarks/bench_plan_memory.py [--only NAME,...] [--json out.json] [--markdown]

~3-4 minutes on 2 cores for the 14 configurations. Results: docs/slurm.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASE = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--train-iters", "2",
        "--lr", "1e-5", "--log-interval", "1", "--transformer-impl", "local", "--seed", "1234"]

#: name -> (world size, flags). Tiny shapes so every run takes seconds on 2 cores.
CONFIGS: dict[str, tuple[int, list[str]]] = {
    "2K fp32": (1, ["--model-preset", "tiny", "--seq-length", "2048", "--vocab-size", "512"]),
    "8K fp32": (1, ["--model-preset", "tiny", "--seq-length", "8192", "--vocab-size", "512"]),
    "32K fp32": (1, ["--model-preset", "tiny", "--seq-length", "32768", "--vocab-size", "512"]),
    "8K bf16": (1, ["--model-preset", "tiny", "--seq-length", "8192", "--vocab-size", "512",
                    "--bf16"]),
    "8K stock loss": (1, ["--model-preset", "tiny", "--seq-length", "8192", "--vocab-size",
                          "8000", "--cross-entropy-impl", "megatron"]),
    "8K chunked loss": (1, ["--model-preset", "tiny", "--seq-length", "8192", "--vocab-size",
                            "8000"]),
    "16K full recompute": (1, ["--model-preset", "tiny-demo", "--seq-length", "16384",
                               "--vocab-size", "2048", "--recompute-granularity", "full",
                               "--recompute-method", "uniform", "--recompute-num-layers", "1"]),
    "16K no recompute": (1, ["--model-preset", "tiny-demo", "--seq-length", "16384",
                             "--vocab-size", "2048"]),
    "4K TP2": (2, ["--model-preset", "tiny-demo", "--seq-length", "4096", "--vocab-size", "2048",
                   "--tensor-model-parallel-size", "2"]),
    "8K CP2": (2, ["--model-preset", "tiny", "--seq-length", "8192", "--vocab-size", "512",
                   "--context-parallel-size", "2"]),
    "4K PP2": (2, ["--model-preset", "tiny-demo", "--seq-length", "4096", "--vocab-size", "2048",
                   "--pipeline-model-parallel-size", "2", "--global-batch-size", "2"]),
    "4K DP2 dist-opt": (2, ["--model-preset", "tiny-demo", "--seq-length", "4096",
                            "--vocab-size", "2000", "--use-distributed-optimizer"]),
    "4K DP2 dist-opt bf16": (2, ["--model-preset", "tiny-demo", "--seq-length", "4096",
                                 "--vocab-size", "2000", "--use-distributed-optimizer",
                                 "--bf16"]),
    "4K TP2 CP1 block 1": (2, ["--model-preset", "tiny-demo", "--seq-length", "4096",
                               "--vocab-size", "2048", "--tensor-model-parallel-size", "2",
                               "--recompute-granularity", "full", "--recompute-method", "block",
                               "--recompute-num-layers", "1"]),
}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker(argv: list[str]) -> int:
    """Run the trainer; measure step 2 and print one JSON line for this rank."""
    from megatron_longctx.tool_env import quiet_tool_warnings

    quiet_tool_warnings()
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    from megatron_longctx.training import loop
    from megatron_longctx.training.entry import main

    original, calls, report = loop.train_step, [0], {}

    class _CallableBuffers(list):
        """megatron's DDP keeps a `buffers` list where nn.Module has a method MemTracker calls."""

        owner: torch.nn.Module

        def __call__(self, *args: object, **kwargs: object) -> object:
            return torch.nn.Module.buffers(self.owner, *args, **kwargs)

    def measured(chunks: list, optimizer: object, *args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] != 2:
            return original(chunks, optimizer, *args, **kwargs)
        tracker = MemTracker()
        inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
        for chunk in chunks:
            wrapped = _CallableBuffers(chunk.buffers)
            wrapped.owner = chunk
            chunk.buffers = wrapped
        tracker.track_external(*[c.module for c in chunks], *inner)
        pre_forward = tracker._pre_fw_hook

        def next_microbatch(module: torch.nn.Module, inputs: object) -> None:
            # MemTracker refuses a root module entered again in forward (it takes that for the
            # next iteration); pipeline schedules do so per micro-batch. Only the global
            # snapshots are read here, so the module's own statistics are dropped instead.
            if not tracker._mod_tracker.is_bw and set(tracker._mod_tracker.parents) <= {
                    "Global", tracker._mod_tracker.get_known_fqn(module)}:
                tracker.memory_tracking.pop(module, None)
            pre_forward(module, inputs)

        tracker._pre_fw_hook = next_microbatch
        model_storages = {p.untyped_storage().data_ptr() for c in chunks
                          for p in c.module.parameters()}
        for chunk in chunks:
            for buf in chunk.buffers:
                tracker._update_and_maybe_create_winfos(buf.grad_data, _MemRefType.GRAD)
                if buf.param_data is not None:
                    tracker._update_and_maybe_create_winfos(buf.param_data, _MemRefType.PARAM)
        for opt in inner:
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.untyped_storage().data_ptr() not in model_storages:
                        tracker._update_and_maybe_create_winfos(p, _MemRefType.OPT)
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        with tracker:
            result = original(chunks, optimizer, *args, **kwargs)
        hwm = _status("VmHWM")
        cur = tracker.get_tracker_snapshot("current")
        peak = tracker.get_tracker_snapshot("peak")
        device = next(iter(peak))
        name = {str(k).split(".")[-1]: v for k, v in peak[device].items()}
        now = {str(k).split(".")[-1]: v for k, v in cur[device].items()}
        report.update(weights=now["PARAM"], gradients=now["GRAD"], optimizer=now["OPT"],
                      peak_total=name["Total"],
                      peak_other=name["Total"] - now["PARAM"] - now["GRAD"] - now["OPT"],
                      rss_rise=hwm - before)
        return result

    loop.train_step = measured
    code = main(argv)
    print("BENCH " + json.dumps({"rank": int(os.environ.get("RANK", 0)), "code": code,
                                 **report}), flush=True)
    return code


def run_config(argv: list[str], world: int, timeout: float = 600) -> list[dict]:
    from megatron_longctx.parallel.init import free_port

    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONPATH=str(REPO),
                   OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--", *argv],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    reports = [json.loads(line[6:]) for out in outs for line in out.splitlines()
               if line.startswith("BENCH ")]
    if len(reports) != world or any(r["code"] for r in reports):
        bad = next((o for o, p in zip(outs, procs) if p.returncode), outs[-1])
        lines = [line for line in bad.splitlines() if "Error" in line or "error" in line]
        raise RuntimeError("trainer failed: " + " / ".join((lines or bad.splitlines())[-4:]))
    return sorted(reports, key=lambda r: r["rank"])


def estimate(argv: list[str], world: int) -> list:
    """The planner's estimate of every PP stage for these trainer flags (CPU: no margin)."""
    from megatron_longctx.config.training import build_pretrain_parser, config_from_args
    from megatron_longctx.plan.inputs import layout_from_config, trainer_model
    from megatron_longctx.plan.memory import estimate_memory

    cfg = config_from_args(build_pretrain_parser().parse_args(argv))
    layout = layout_from_config(cfg, world, cuda=False)
    model = trainer_model(cfg)
    return [estimate_memory(model, layout, stage=s) for s in range(layout.pp)], layout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated configuration names")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args(argv)
    names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    rows = []
    mb = 1e6
    head = (f"{'configuration':<22} {'w meas/est MB':>15} {'grad':>13} {'opt':>13} "
            f"{'act meas/est MB':>17} {'err':>6} {'total meas/est':>15} {'err':>6} {'RSS rise':>8}")
    print(head)
    for name in names:
        world, flags = CONFIGS[name]
        argv_ = [*BASE, *flags]
        start = time.time()
        reports = run_config(argv_, world)
        ests, layout = estimate(argv_, world)
        # the most loaded rank measured against the estimate of its PP stage
        ranks_per_stage = world // layout.pp
        pairs = [(r, ests[r["rank"] // ranks_per_stage if layout.pp > 1 else 0])
                 for r in reports]
        meas, est = max(pairs, key=lambda p: p[0]["peak_total"])
        row = {"name": name, "world": world, "seconds": round(time.time() - start, 1),
               "weights": (meas["weights"], est.state.weights),
               "gradients": (meas["gradients"], est.state.gradients),
               "optimizer": (meas["optimizer"], est.state.optimizer),
               "activations": (meas["peak_other"], est.activation_bytes),
               "total": (meas["peak_total"], est.raw_bytes), "rss_rise": meas["rss_rise"]}
        rows.append(row)

        def err(pair: tuple) -> float:
            return (pair[1] - pair[0]) / pair[0] * 100

        def exact(pair: tuple) -> str:
            return f"{pair[0] / mb:.3f}" + ("=" if pair[0] == pair[1] else f"/{pair[1] / mb:.3f}")

        print(f"{name:<22} {exact(row['weights']):>15} {exact(row['gradients']):>13} "
              f"{exact(row['optimizer']):>13} "
              f"{row['activations'][0] / mb:8.1f}/{row['activations'][1] / mb:<8.1f} "
              f"{err(row['activations']):+5.1f}% "
              f"{row['total'][0] / mb:7.1f}/{row['total'][1] / mb:<7.1f} "
              f"{err(row['total']):+5.1f}% {row['rss_rise'] / mb:8.1f}", flush=True)
    if args.markdown:
        print("\n| configuration | ranks | weights | gradients | optimizer | activations "
              "measured / estimated MB | error | total measured / estimated MB | error |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            cells = ["exact" if r[k][0] == r[k][1] else f"{r[k][0]} / {r[k][1]}"
                     for k in ("weights", "gradients", "optimizer")]
            a, t = r["activations"], r["total"]
            print(f"| {r['name']} | {r['world']} | {' | '.join(cells)} | {a[0] / mb:.1f} / "
                  f"{a[1] / mb:.1f} | {(a[1] - a[0]) / a[0] * 100:+.1f}% | {t[0] / mb:.1f} / "
                  f"{t[1] / mb:.1f} | {(t[1] - t[0]) / t[0] * 100:+.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:]))
    sys.exit(main())
