#!/usr/bin/env python3
"""Merge the shards of a sharded tools/preprocess_data.py run (one dataset per domain and key).

    python tools/merge_datasets.py --input-prefix data/slimpajama --output-prefix data/merged

Reads `{input_prefix}.shardNNNNN-ofKKKKK.done.json` markers; refuses to merge while any shard is
incomplete. The result equals one unsharded run over the same files (bytes and stats).
"""

import argparse
import sys

from megatron_longctx.data.merge import MergeError, merge_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-prefix", required=True, help="--output-prefix of the shard runs")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    try:
        merged = merge_shards(args.input_prefix, args.output_prefix)
    except (MergeError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for prefix, info in merged.items():
        print(f"{prefix}.bin/.idx  {info['documents']:,} docs  {info['tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
