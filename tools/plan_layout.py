#!/usr/bin/env python3
"""Will it fit, how fast, which layout: the planner's per-GPU memory and step-time estimate.

    # one layout (flags as pretrain_longctx.py takes them)
    python tools/plan_layout.py --model-preset llama2-7b --seq-length 131072 \
        --tp 4 --cp 4 --nodes 2 --recompute block:8
    # search: layouts that fit 8 x 80 GB, fastest first, with the flags of the best
    python tools/plan_layout.py --model-preset llama3-8b --seq-length 131072 --search

The model comes from a preset, an HF config directory (--hf-config) or a checkpoint (--load).
For a run's exact flags use `pretrain_longctx.py ... --dry-run`. Exit codes: 0 (fits / a
layout found), 1 (does not fit / none found), 2 (bad input). megatron_longctx/plan explains
every term; docs/slurm.md compares the estimates with measured peaks.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_longctx.config.presets import PRESET_NAMES  # noqa: E402


def _recompute(text: str) -> tuple[str | None, str | None, int | None]:
    """none | selective | uniform:N | block:N."""
    if text in ("none", ""):
        return None, None, None
    if text == "selective":
        return "selective", None, None
    method, _, n = text.partition(":")
    if method not in ("uniform", "block") or not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"--recompute {text!r}: none | selective | uniform:N "
                                         "| block:N")
    return "full", method, int(n)


def build_parser() -> argparse.ArgumentParser:
    """The tool's flags: model source, one layout, cluster and time."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    src = ap.add_argument_group("model")
    src.add_argument("--model-preset", choices=PRESET_NAMES)
    src.add_argument("--hf-config", help="HF model directory (config.json)")
    src.add_argument("--load", help="checkpoint root or iter_ directory")
    src.add_argument("--seq-length", type=int, required=True)
    lay = ap.add_argument_group("layout (one layout; ignored with --search)")
    lay.add_argument("--tp", type=int, default=1)
    lay.add_argument("--cp", type=int, default=1)
    lay.add_argument("--pp", type=int, default=1)
    lay.add_argument("--vpp", type=int, default=1)
    lay.add_argument("--micro-batch-size", type=int, default=1)
    lay.add_argument("--recompute", type=_recompute, default=(None, None, None),
                     help="none | selective | uniform:N | block:N (full recompute of N layers)")
    lay.add_argument("--precision", choices=("bf16", "fp8", "fp32"), default="bf16")
    lay.add_argument("--transformer-impl", choices=("transformer_engine", "local"),
                     default="transformer_engine")
    lay.add_argument("--cross-entropy-impl", choices=("chunked", "megatron"), default="chunked")
    lay.add_argument("--no-distributed-optimizer", action="store_true")
    lay.add_argument("--offload-modules", nargs="*", default=[],
                     help="megatron's fine-grained activation offloading modules (attn_norm "
                          "qkv_linear core_attn attn_proj mlp_norm)")
    cl = ap.add_argument_group("cluster and time")
    cl.add_argument("--search", action="store_true", help="rank the layouts that fit")
    cl.add_argument("--gpus-per-node", type=int, default=8)
    cl.add_argument("--nodes", type=int, default=1)
    cl.add_argument("--gpu-memory-gb", type=float, default=80.0)
    cl.add_argument("--global-batch-tokens", type=int, default=4 * 1024 * 1024,
                    help="tokens per step (the paper: 4M)")
    cl.add_argument("--mfu", type=float, default=None, help="assumed MFU (default: the NeMo "
                    "LLaMA-2 7B 128K anchor, 0.327)")
    cl.add_argument("--token-budget", type=float, default=5e9)
    return ap


def _one_layout(args: argparse.Namespace, model: Any, base: Any, mfu: float) -> int:
    """Estimate the layout the flags give; 0 when it fits, 1 when not, 2 on a bad layout."""
    from megatron_longctx.plan.memory import estimate_memory
    from megatron_longctx.plan.search import estimate_time, format_estimate

    world = args.gpus_per_node * args.nodes
    mp = args.tp * args.cp * args.pp
    if world % mp:
        print(f"plan_layout.py: error: {world} GPUs are not a multiple of TP*CP*PP = {mp}",
              file=sys.stderr)
        return 2
    dp = world // mp
    gbs = max(dp, args.global_batch_tokens // args.seq_length)
    gran, method, n = args.recompute
    layout = replace(base, tp=args.tp, cp=args.cp, pp=args.pp, vpp=args.vpp, dp=dp,
                     micro_batch_size=args.micro_batch_size,
                     num_microbatches=max(1, gbs // (dp * args.micro_batch_size)),
                     sequence_parallel=args.tp > 1, recompute_granularity=gran,
                     recompute_method=method, recompute_num_layers=n)
    mem = estimate_memory(model, layout)
    time = estimate_time(model, layout, mfu=mfu, token_budget=args.token_budget,
                         gpus_per_node=args.gpus_per_node)
    print(format_estimate(model, mem, time, gpu_memory_gb=args.gpu_memory_gb))
    print("flags: " + " ".join(layout.flags()))
    return 0 if mem.total_bytes <= args.gpu_memory_gb * 1e9 else 1



def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from megatron_longctx.plan.inputs import load_model
    from megatron_longctx.plan.memory import Layout, with_sequence
    from megatron_longctx.plan.search import (
        DEFAULT_MFU,
        MFU_SOURCE,
        format_search,
        search_layouts,
    )

    try:
        model = with_sequence(load_model(preset=args.model_preset, hf_dir=args.hf_config,
                                         checkpoint=args.load), args.seq_length)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"plan_layout.py: error: {err}", file=sys.stderr)
        return 2
    mfu = args.mfu or DEFAULT_MFU
    fp8 = args.precision == "fp8"
    base = Layout(dtype="fp32" if args.precision == "fp32" else "bf16", fp8=fp8,
                  impl=args.transformer_impl, cross_entropy_impl=args.cross_entropy_impl,
                  distributed_optimizer=not args.no_distributed_optimizer,
                  offload_modules=tuple(args.offload_modules))
    if args.mfu is None:
        print(f"MFU {DEFAULT_MFU} assumed: {MFU_SOURCE}")
    if args.search:
        cands = search_layouts(model, gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                               gpu_memory_gb=args.gpu_memory_gb,
                               global_batch_tokens=args.global_batch_tokens, mfu=mfu,
                               token_budget=args.token_budget, base=base)
        print(format_search(model, cands, gpu_memory_gb=args.gpu_memory_gb))
        return 0 if any(c.fits for c in cands) else 1
    return _one_layout(args, model, base, mfu)

if __name__ == "__main__":
    sys.exit(main())
