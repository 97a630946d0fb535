#!/usr/bin/env python3
"""Needle grid wall time: prefix reuse across cells (`run_needle`'s default) vs every prompt
prefilled from scratch (`--no-prefix-reuse`), same model, same grid, one run.

Within a length, each depth after a smaller one shares the template head and the haystack up to
the smaller depth's insertion point, so a depth sweep reuses part of its prompt tokens; the
late, non-reused positions are the costly ones (attention grows with position). By default the
model is bench_ruler.py's random tiny-demo-shaped LLaMA (BPE vocab 2048, converted to our
format); `--model/--tokenizer-model` run a trained checkpoint instead (docs/evaluation.md's
number is the demo's stage-2 checkpoint). Prints wall seconds, prompt tokens reused, the ratio
reuse / no reuse, and whether every response is the same.

    python benchmarks/bench_needle.py [--length 16384] [--depths 10] [--max-new-tokens 16]
        [--model DIR --tokenizer-model DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_longctx.tool_env import quiet_tool_warnings  # noqa: E402

quiet_tool_warnings()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--depths", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--model", default=None, help="checkpoint or HF dir (default: random)")
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    from megatron_longctx.eval.models import load_causal_lm
    from megatron_longctx.eval.needle import NeedleSettings, depth_grid, run_needle

    torch.set_num_threads(args.threads)
    settings = NeedleSettings(lengths=[args.length], depths=depth_grid(args.depths),
                              max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, tokenizer = args.model, args.tokenizer_model
        if model_dir is None:
            from bench_ruler import make_models

            _, model_dir = make_models(root, args.length + args.max_new_tokens)
        runs = {}
        for name, reuse in (("prefix reuse", True), ("no reuse", False)):
            model = load_causal_lm(model_dir, tokenizer_model=tokenizer,
                                   prefill_chunk=args.prefill_chunk)
            start = time.perf_counter()
            state = run_needle(model, settings, root / name.replace(" ", "_"),
                               reuse_prefix=reuse, plot=False, log=None)
            runs[name] = (time.perf_counter() - start, list(state["cells"]))
            model.close()
    base, cells = runs["no reuse"]
    prompt = sum(c["tokens"] for c in cells)
    print(f"{len(cells)} cells at {args.length} tokens, {prompt:,} prompt tokens, "
          f"{args.max_new_tokens} new tokens, {args.threads} thread(s)")
    print(f"{'mode':14s} {'wall s':>8s} {'reused tokens':>16s} {'time vs no reuse':>17s}")
    for name, (seconds, run_cells) in runs.items():
        reused = sum(c["reused_tokens"] for c in run_cells)
        print(f"{name:14s} {seconds:8.2f} {reused:>10,d} ({100 * reused / prompt:3.0f}%) "
              f"{seconds / base:15.2f}x")
    same = [c["response"] for c in runs["prefix reuse"][1]] == [c["response"] for c in cells]
    print("responses: " + ("same" if same else "DIFFER"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
