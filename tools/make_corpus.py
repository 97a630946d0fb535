#!/usr/bin/env python3
"""Write the deterministic synthetic SlimPajama-style corpus used by the demo and the tests.

Example:
    python tools/make_corpus.py --output-dir demo_output/corpus --total-words 2000000

Writes ``chunk_{i:05d}.jsonl.zst`` (or ``.jsonl.gz`` / ``.jsonl``) files plus
``corpus_config.json`` and prints one line per domain: documents, words (and share of all
words), median document length in words, and the share of the domain's words that sit in
documents longer than ``4096 * length_scale`` words (the paper's 4K-token threshold, scaled).
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_longctx.config.flags import add_config_flags, config_from_namespace
from megatron_longctx.data.synthetic import CorpusConfig, summarize_plan, write_corpus


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser: ``--output-dir`` plus one flag per `CorpusConfig` field
    (defaults and help text are the dataclass's)."""
    parser = argparse.ArgumentParser(
        description="Write a deterministic synthetic corpus in SlimPajama's jsonl format."
    )
    parser.add_argument("--output-dir", required=True, help="directory for the chunk files")
    add_config_flags(parser, CorpusConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the corpus, print a per-domain summary.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        Process exit status (0 on success; argument errors exit with status 2).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_namespace(CorpusConfig, args).validate()
    except ValueError as err:
        parser.error(str(err))

    start = time.perf_counter()
    paths = write_corpus(config, args.output_dir)
    elapsed = time.perf_counter() - start

    summary = summarize_plan(config)
    docs = words = 0
    for item in summary.values():
        docs += item.documents
        words += item.words
        print(
            f"{item.domain:<24} docs={item.documents:>8,} words={item.words:>11,} "
            f"({100 * item.word_share:5.2f}%) median_words={item.median_words:>9,.0f} "
            f"long_share(>{item.long_threshold}w)={100 * item.long_word_share:5.1f}%"
        )
    print(
        f"wrote {len(paths)} files to {args.output_dir}: {docs:,} documents, {words:,} words "
        f"in {elapsed:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
