#!/usr/bin/env python3
"""RULER-style synthetic long-context suite (13 RULER tasks + HELMET JSON KV): results.json,
results.md, ruler.png.

    python tools/eval_ruler.py --model ckpt/run1 --output-dir eval/ruler          # 4K..128K
    python tools/eval_ruler.py --model ckpt/demo --lengths 512,1024 --num-samples 20 \
        --tasks niah_single_1,niah_single_2,vt --output-dir eval/ruler-demo
    torchrun --nproc-per-node 8 tools/eval_ruler.py --model ckpt/llama2-7b-80k \
        --tensor-model-parallel-size 8 --dtype bf16 --squad-file squad_dev_v2.json \
        --output-dir eval/ruler-7b

`--model` is a checkpoint of ours or a Hugging Face directory (auto-detected). Reruns resume:
complete (task, length) cells are skipped. Tasks and rules: megatron_longctx/eval/ruler_tasks.py
and docs/evaluation.md. Exit codes: 0 done, 2 bad flags or inputs, or some (task, length)
cells failed to build (the others still ran; results.md lists the failures).
"""

from __future__ import annotations

import argparse
import sys

from megatron_longctx.eval.models import add_model_arguments, comma_ints, run_with_model
from megatron_longctx.eval.ruler import RulerSettings, run_ruler
from megatron_longctx.eval.ruler_tasks import RULER_LENGTHS, TASKS
from megatron_longctx.tool_env import quiet_tool_warnings, tool_error

quiet_tool_warnings()
TOOL = "eval_ruler.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--output-dir", required=True,
                        help="results.json, results.md and ruler.png")
    grid = parser.add_argument_group("suite")
    grid.add_argument("--tasks", default=None,
                      help=f"comma-separated tasks (default: all but QA, plus qa_1/qa_2 when "
                      f"their file is given); choose from {','.join(TASKS)}")
    grid.add_argument("--lengths", default=",".join(str(x) for x in RULER_LENGTHS),
                      help="comma-separated lengths in tokens, prompt + new tokens (RULER's "
                      "default 4096..131072)")
    grid.add_argument("--num-samples", type=int, default=500,
                      help="samples per task and length (RULER: 500)")
    grid.add_argument("--seed", type=int, default=42)
    grid.add_argument("--max-new-tokens", type=int, default=None,
                      help="one generation budget for all tasks (default: RULER's per task: "
                      "niah 128, vt 30, cwe 120, fwe 50, qa 32, json_kv 100)")
    data = parser.add_argument_group("data")
    data.add_argument("--haystack-file", default=None,
                      help="essay haystack: .txt / .jsonl file or directory of them (RULER "
                      "uses Paul Graham's essays: pass that text to compare with published "
                      "RULER runs; default: a generated, non-repeating essay)")
    data.add_argument("--squad-file", default=None,
                      help="SQuAD v2-format JSON for qa_1 (skipped without it)")
    data.add_argument("--hotpotqa-file", default=None,
                      help="HotpotQA-format JSON for qa_2 (skipped without it)")
    out = parser.add_argument_group("output")
    out.add_argument("--training-length", type=int, default=None,
                     help="plot line (default: the checkpoint's --seq-length)")
    out.add_argument("--overwrite", action="store_true",
                     help="start over instead of resuming an existing results.json")
    out.add_argument("--no-prefix-reuse", action="store_true",
                     help="prefill every prompt from scratch (no shared-prefix KV reuse)")
    out.add_argument("--no-cache", action="store_true",
                     help="recompute the whole sequence per new token (slow; for checks)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def settings_from_args(args: argparse.Namespace) -> RulerSettings:
    """RulerSettings from the flags (validated)."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    return RulerSettings(
        tasks=tasks, lengths=comma_ints(args.lengths, "--lengths"), num_samples=args.num_samples,
        seed=args.seed, haystack_file=args.haystack_file, squad_file=args.squad_file,
        hotpotqa_file=args.hotpotqa_file, max_new_tokens=args.max_new_tokens,
        training_length=args.training_length,
    ).validate()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reuse = not (args.no_prefix_reuse or args.no_cache)

    def job(m, settings: RulerSettings) -> None:
        results = run_ruler(m, settings, args.output_dir, overwrite=args.overwrite,
                            use_cache=not args.no_cache, reuse_prefix=reuse,
                            progress=not args.no_progress)
        overall = results["overall"]
        print(f"{results['headline']['label']}: "
              f"{'n/a' if overall is None else f'{overall:.2f}'} ({results['cells_done']} "
              f"cells; essay haystack: {results['settings']['haystack_source']}; "
              f"{args.output_dir}/results.json, results.md, ruler.png)")
        failed.extend(results.get("failed", []))

    failed: list[dict] = []
    try:
        run_with_model(args, settings_from_args, job)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        return tool_error(err, TOOL)
    if failed:
        first = failed[0]
        return tool_error(ValueError(
            f"{len(failed)} cell(s) failed, the others ran (listed in results.md); first: "
            f"{first['task']} at {first['length']}: {first['error']}"), TOOL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
