#!/usr/bin/env python3
"""Loss by context position and domain on held-out long documents: ppl.json + plot.

    python tools/eval_ppl.py --model ckpt/run1 --mixture-plan mix/mixture_plan.json \
        --seq-length 131072 --output-dir eval/ppl
    python tools/eval_ppl.py --model hf/llama-2-7b --data-path data/sp_RedPajamaBook_text_document \
        --valid-fraction 0.01 --seq-length 32768 --buckets 0,1024,4096,16384 --output-dir eval/ppl
    torchrun --nproc-per-node 8 tools/eval_ppl.py --model ckpt/run1 --mixture-plan plan.json \
        --tensor-model-parallel-size 4 --context-parallel-size 2 --seq-length 131072 ...

`--model` is a checkpoint of ours or a Hugging Face directory (auto-detected). Details:
megatron_longctx/eval/ppl.py and docs/evaluation.md. Exit codes: 0 done, 2 bad flags or inputs.
"""

from __future__ import annotations

import argparse
import sys

from megatron_longctx.eval.models import add_model_arguments, drive, model_from_args
from megatron_longctx.eval.ppl import (
    parse_bucket_edges,
    run_ppl,
    sources_from_data_paths,
    sources_from_mixture_plan,
)
from megatron_longctx.tool_env import quiet_tool_warnings, tool_error

quiet_tool_warnings()
TOOL = "eval_ppl.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, tokenizer=False)
    parser.add_argument("--output-dir", required=True, help="ppl.json and loss_by_position.png")
    data = parser.add_argument_group("data (exactly one of --data-path / --mixture-plan)")
    data.add_argument("--data-path", nargs="+", default=None,
                      help="indexed dataset prefixes (Megatron's 'w1 p1 w2 p2' form accepted; "
                      "weights ignored)")
    data.add_argument("--valid-fraction", type=float, default=None,
                      help="with --data-path: use only the last fraction of each dataset's "
                      "documents (default: all of them)")
    data.add_argument("--mixture-plan", default=None,
                      help="mixture_plan.json: its domains' held-out (valid) documents")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--seq-length", type=int, default=None,
                    help="tokens per document from its start (default: the checkpoint's "
                    "--seq-length; HF: max_position_embeddings)")
    ev.add_argument("--min-doc-length", type=int, default=None,
                    help="shortest document used (default: --seq-length)")
    ev.add_argument("--max-docs-per-domain", type=int, default=8)
    ev.add_argument("--buckets", default=None,
                    help="comma-separated bucket edges from 0 (default 0,1024,4096,16384,32768 "
                    "then doubling, up to --seq-length)")
    return parser


def _check_datasets(items: list[str]) -> None:
    """Every --data-path prefix is a complete .bin/.idx pair (a truncated .bin would otherwise
    give short documents silently); DatasetError names the file."""
    from megatron_longctx.data.indexed import check_dataset

    for item in items:
        try:
            float(item)  # Megatron's weights in `w1 p1 w2 p2`
        except ValueError:
            check_dataset(item)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if (args.data_path is None) == (args.mixture_plan is None):
            raise ValueError("give exactly one of --data-path and --mixture-plan")
        if args.mixture_plan is not None and args.valid_fraction is not None:
            raise ValueError("--valid-fraction applies to --data-path (a mixture plan knows "
                             "its held-out documents)")
        if args.data_path is not None:
            _check_datasets(args.data_path)
        sources = (sources_from_mixture_plan(args.mixture_plan) if args.mixture_plan
                   else sources_from_data_paths(args.data_path, args.valid_fraction))
        model = model_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        return tool_error(err, TOOL)

    def job(m) -> None:
        seq = args.seq_length or m.training_length or m.max_position_embeddings
        if not seq:
            raise ValueError("--seq-length is needed: the model does not say its length")
        edges = parse_bucket_edges(args.buckets, seq)
        result = run_ppl(m, sources, args.output_dir, seq_length=seq, edges=edges,
                         min_length=args.min_doc_length,
                         max_docs_per_domain=args.max_docs_per_domain)
        width = max([len(b["label"]) for b in result["buckets"]] + [6])
        print(f"\n{'bucket':>{width}s} {'tokens':>10s} {'loss':>8s} {'ppl':>9s}")
        for b in result["buckets"]:
            loss = "-" if b["loss"] is None else f"{b['loss']:.4f}"
            ppl = "-" if b["ppl"] is None else f"{b['ppl']:.2f}"
            print(f"{b['label']:>{width}s} {b['tokens']:10d} {loss:>8s} {ppl:>9s}")
        for name, d in sorted(result["domains"].items()):
            print(f"{name}: {d['documents']} documents, {d['tokens']} tokens, "
                  f"loss {d['loss']:.4f}")
        print(f"all: loss {result['overall']['loss']:.4f} over {result['overall']['tokens']} "
              f"tokens ({result['tokens_per_second']} tokens/s) -> "
              f"{args.output_dir}/ppl.json, loss_by_position.png")

    try:
        drive(model, job)
    except (ValueError, FileNotFoundError) as err:
        return tool_error(err, TOOL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
