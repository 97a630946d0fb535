#!/usr/bin/env python3
"""Needle-in-a-haystack evaluation (Fu et al. 2024 protocol): results.json + heatmap.png.

    python tools/eval_needle.py --model ckpt/run1 --output-dir eval/needle     # paper grid
    python tools/eval_needle.py --model ckpt/demo --needle-type synthetic-fact \
        --lengths 256,512,1024,2048 --depths 5 --output-dir eval/needle-demo
    torchrun --nproc-per-node 8 tools/eval_needle.py --model ckpt/llama2-7b-80k \
        --tensor-model-parallel-size 8 --dtype bf16 --output-dir eval/needle-7b

`--model` is a checkpoint of ours or a Hugging Face directory (auto-detected). Reruns resume:
cells already in results.json are skipped. Protocol details: megatron_longctx/eval/needle.py
and docs/evaluation.md. Exit codes: 0 done, 2 bad flags or inputs.
"""

from __future__ import annotations

import argparse
import sys

from megatron_longctx.eval.models import add_model_arguments, comma_ints, run_with_model
from megatron_longctx.eval.needle import (
    NEEDLE_TYPES,
    NeedleSettings,
    depth_grid,
    paper_lengths,
    run_needle,
)
from megatron_longctx.tool_env import quiet_tool_warnings, tool_error

quiet_tool_warnings()
TOOL = "eval_needle.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--output-dir", required=True, help="results.json and heatmap.png")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--lengths", default=None,
                      help="comma-separated prompt lengths in tokens (overrides the next three)")
    grid.add_argument("--min-length", type=int, default=1000)
    grid.add_argument("--max-length", type=int, default=128000)
    grid.add_argument("--num-lengths", type=int, default=40,
                      help="lengths = round(linspace(min, max, num)) (paper: 1000..128000, 40)")
    grid.add_argument("--depths", type=int, default=10,
                      help="number of depths, round(linspace(0, 100, N)) percent (paper: 10)")
    grid.add_argument("--depth-percents", default=None,
                      help="comma-separated depths in percent (overrides --depths)")
    needle = parser.add_argument_group("needle")
    needle.add_argument("--needle-type", choices=NEEDLE_TYPES, default="paper",
                        help="paper (San Francisco needle, or --needle/--question/--answer), "
                        "passkey (random 5 digits), synthetic-fact (the demo corpus's facts)")
    needle.add_argument("--needle", default=None, help="custom needle sentence")
    needle.add_argument("--question", default=None, help="custom question")
    needle.add_argument("--answer", default=None,
                        help="text whose words are scored (default: the needle)")
    needle.add_argument("--prompt-template", default=None,
                        help="prompt with {context} and {question} (default per needle type; "
                        "paper: the released code's 'This is a very long story book' prompt)")
    needle.add_argument("--haystack", default=None,
                        help=".txt / .jsonl file or directory of them (default: synthetic "
                        "Book-style text, offline)")
    needle.add_argument("--max-new-tokens", type=int, default=50)
    needle.add_argument("--seed", type=int, default=1234)
    out = parser.add_argument_group("output")
    out.add_argument("--training-length", type=int, default=None,
                     help="heatmap line (default: the checkpoint's --seq-length)")
    out.add_argument("--overwrite", action="store_true",
                     help="start over instead of resuming an existing results.json")
    out.add_argument("--no-prefix-reuse", action="store_true",
                     help="prefill every cell's prompt from scratch (no shared-prefix KV reuse)")
    out.add_argument("--no-cache", action="store_true",
                     help="recompute the whole sequence per new token (slow; for checks)")
    return parser


def settings_from_args(args: argparse.Namespace) -> NeedleSettings:
    """NeedleSettings from the flags (validated)."""
    if args.lengths is not None:
        lengths = comma_ints(args.lengths, "--lengths")
    else:
        lengths = paper_lengths(args.min_length, args.max_length, args.num_lengths)
    if args.depth_percents is not None:
        try:
            depths = [float(x) for x in args.depth_percents.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--depth-percents: expected numbers, got "
                             f"{args.depth_percents!r}") from None
    else:
        depths = depth_grid(args.depths)
    return NeedleSettings(
        lengths=lengths, depths=depths, needle_type=args.needle_type, needle=args.needle,
        question=args.question, answer=args.answer, template=args.prompt_template,
        haystack=args.haystack, max_new_tokens=args.max_new_tokens, seed=args.seed,
        training_length=args.training_length,
    ).validate()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def job(m, settings: NeedleSettings) -> None:
        results = run_needle(m, settings, args.output_dir, overwrite=args.overwrite,
                             use_cache=not args.no_cache,
                             reuse_prefix=not args.no_prefix_reuse)
        print(f"overall score: {results['overall']:.2f} over {results['cells_done']} cells "
              f"({args.output_dir}/results.json, heatmap.png)")

    try:
        run_with_model(args, settings_from_args, job)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        return tool_error(err, TOOL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
