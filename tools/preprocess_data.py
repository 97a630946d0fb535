#!/usr/bin/env python3
"""jsonl / .jsonl.gz / .jsonl.zst -> Megatron indexed datasets (.bin/.idx), one per domain.

Megatron-LM's flags and output names; outputs are byte-identical to Megatron-LM's
tools/preprocess_data.py (core_v0.16.1) for the same input, tokenizer and flags. Additions:
--domain-key (per-domain outputs), --shard-index/--num-shards (SLURM array tasks), --on-error,
a stats file beside each dataset. See megatron_longctx/data/preprocess.py for the design.
"""

import sys

from megatron_longctx.config.cli import parse_preprocess_args
from megatron_longctx.data.preprocess import PreprocessError, run_preprocess


def main(argv: list[str] | None = None) -> int:
    cfg = parse_preprocess_args(argv)
    try:
        result = run_preprocess(cfg)
    except (PreprocessError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    s = result.summary
    state = "already complete" if result.skipped_as_complete else "done"
    print(f"{result.prefix}: {state}: {s['documents_written']:,} documents, "
          f"{s['tokens_written']:,} tokens from {s['records_read']:,} records "
          f"({s['rates']}); skipped {s['skipped'] or 'none'}")
    for prefix, info in result.datasets.items():
        print(f"  {prefix}.bin/.idx  {info['documents']:,} docs  {info['tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
