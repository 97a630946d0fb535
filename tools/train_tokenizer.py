#!/usr/bin/env python3
"""Train a small byte-level BPE tokenizer on jsonl(.gz/.zst) text, offline.

    python tools/train_tokenizer.py --input corpus/ --output-dir tok --vocab-size 4096
"""

import argparse
import sys

from megatron_longctx.data.train_tokenizer import iter_texts, train_bpe_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="files, globs or directories")
    parser.add_argument("--output-dir", required=True, help="tokenizer directory to write")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--max-bytes", type=int, default=50_000_000,
                        help="train on at most this many bytes of text")
    args = parser.parse_args(argv)
    try:
        out = train_bpe_tokenizer(
            iter_texts(args.input, args.json_key, args.max_bytes), args.output_dir, args.vocab_size
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
