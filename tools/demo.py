#!/usr/bin/env python3
"""`make demo`: the whole recipe on the embedded synthetic corpus, through the tools' own CLIs.

    python tools/demo.py --output-dir demo_output               # what `make demo` runs
    python tools/demo.py --output-dir demo_cut --strategy cut   # the paper's mixture ablation

Parse the flags into `DemoSettings` (one flag per field: defaults and help are the dataclass's),
run megatron_longctx/demo/pipeline.py's stages, print the needle table and the report's path.
`--strategy cut` or `original` changes only stage 2's mixture. Numbers and settings:
docs/demo.md. Exit codes: 0 done, 2 bad flags, otherwise the failing step's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from megatron_longctx.demo.cli import add_settings_arguments, settings_from_args
from megatron_longctx.demo.pipeline import DemoSettings, run_demo


def build_parser() -> argparse.ArgumentParser:
    """``--output-dir`` plus one flag per `DemoSettings` field."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_output",
                        help="where everything goes (default: demo_output)")
    add_settings_arguments(parser, DemoSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(DemoSettings, args)
    except ValueError as err:
        parser.error(str(err))
    try:
        result = run_demo(settings, args.output_dir)
    except subprocess.CalledProcessError as err:
        print(f"\ndemo: step failed (exit {err.returncode}): {' '.join(err.cmd)}",
              file=sys.stderr)
        return err.returncode or 1
    print("\n" + "\n".join(result.summary))
    root = result.paths.root
    print(f"\nreport: {root / 'report.md'} (numbers: {root / 'report.json'})")
    print(f"\ndemo outputs: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
