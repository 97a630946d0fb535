#!/usr/bin/env python3
"""Greedy generation for the needle tool: KV cache + chunked prefill vs full recompute, same run.

Builds a random tiny-demo-shaped LLaMA (4 layers, width 256, GQA 8/4) as a checkpoint of ours,
opens it with the evaluation backend (`megatron_longctx.eval.models.load_causal_lm`), and times
`generate` of --new-tokens tokens after prompts of each --lengths, once with the KV cache and
once recomputing the whole sequence per new token (`use_cache=False`, the baseline). Checks the
two produce the same tokens, and prints seconds for both and the recompute / cache ratio.

    python benchmarks/bench_decode.py [--lengths 512,2048] [--new-tokens 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_longctx.tool_env import quiet_tool_warnings  # noqa: E402

quiet_tool_warnings()


def make_checkpoint(root: Path, max_length: int) -> str:
    from megatron_longctx.checkpoint.model_io import save_model_checkpoint, single_process_group
    from megatron_longctx.config.model import ParallelConfig
    from megatron_longctx.config.presets import get_preset
    from megatron_longctx.model.build import build_model_chunks

    cfg = dataclasses.replace(get_preset("tiny-demo"), seq_length=max_length,
                              max_position_embeddings=max(max_length, 8192))
    with single_process_group():
        chunks = build_model_chunks(cfg, ParallelConfig())
        save_model_checkpoint(chunks, root, 0, cfg, ParallelConfig(), source="bench_decode")
    return str(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    from megatron_longctx.eval.models import load_causal_lm

    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "ckpt", max(lengths) + args.new_tokens)
        model = load_causal_lm(path)
        try:
            print(f"{'prompt':>8s} {'cached s':>9s} {'recompute s':>12s} {'ratio':>7s}")
            for length in lengths:
                ids = torch.randint(1, 2000, (length,), generator=torch.Generator().manual_seed(
                    length)).tolist()
                times, outs = {}, {}
                for cache in (True, False):
                    start = time.perf_counter()
                    outs[cache] = model.generate(ids, args.new_tokens, use_cache=cache)
                    times[cache] = time.perf_counter() - start
                same = "same tokens" if outs[True] == outs[False] else "TOKENS DIFFER"
                print(f"{length:8d} {times[True]:9.2f} {times[False]:12.2f} "
                      f"{times[False] / times[True]:6.1f}x  ({same})", flush=True)
        finally:
            model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
