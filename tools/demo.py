#!/usr/bin/env python3
"""`make demo`: the whole recipe on the embedded synthetic corpus, through the tools' own CLIs.

    python tools/demo.py --output-dir demo_output               # what `make demo` runs
    python tools/demo.py --output-dir demo_cut --strategy cut   # one other stage-2 mixture
    python tools/demo.py --ablation --output-dir ablation_output  # `make ablation`: all arms

Parse the flags into `DemoSettings` (one flag per field: defaults and help are the dataclass's),
run megatron_longctx/demo/pipeline.py's stages, print the needle table and the report's path.
`--strategy cut` or `original` changes only stage 2's mixture. `--ablation` runs the demo's
stage 1 once, then every arm's stage 2 from it for `--seeds` seeds, with mean and 95% interval
per number (megatron_longctx/demo/ablation.py; the generic tool is tools/ablate_mixture.py).
Numbers and settings: docs/demo.md. Exit codes: 0 done, 2 bad flags or inputs, otherwise the
failing step's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from megatron_longctx.demo.numerics import reexec_pinned

# Same numbers on every x86-64 machine: threads, vector width and BLAS path are fixed
# before torch loads (megatron_longctx/demo/numerics.py).
reexec_pinned()

from megatron_longctx.config.flags import add_config_flags, config_from_namespace  # noqa: E402
from megatron_longctx.demo.ablation import (  # noqa: E402
    ABLATION_ARMS,
    DEMO_SEEDS,
    parse_names,
    run_demo_ablation,
)
from megatron_longctx.demo.pipeline import DemoSettings, run_demo  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """``--output-dir`` plus one flag per `DemoSettings` field."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_output",
                        help="where everything goes (default: demo_output)")
    parser.add_argument("--ablation", action="store_true",
                        help="the stage-2 mixture comparison: every strategy from one stage 1 "
                        "(--strategy is then unused; report.md, results.json, plots/)")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help=f"with --ablation: seeds per arm, --seed 1234 upwards (default "
                        f"{DEMO_SEEDS}; a rerun with more extends the results)")
    parser.add_argument("--strategies", type=parse_names, default=None, metavar="ARM,...",
                        help="with --ablation: the arms to compare, in run order (default "
                        f"{','.join(ABLATION_ARMS)})")
    add_config_flags(parser, DemoSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = config_from_namespace(DemoSettings, args)
    except ValueError as err:
        parser.error(str(err))
    for flag, value in (("--seeds", args.seeds), ("--strategies", args.strategies)):
        if value is not None and not args.ablation:
            parser.error(f"{flag} applies to --ablation only")
    try:
        if args.ablation:
            ablation = run_demo_ablation(
                settings, args.output_dir, seeds=DEMO_SEEDS if args.seeds is None else args.seeds,
                arms=ABLATION_ARMS if args.strategies is None else args.strategies)
            print("\n" + "\n".join(ablation.summary))
            root = ablation.paths.root
            print(f"\nreport: {root / 'report.md'} (numbers: {root / 'results.json'})")
            return 0
        result = run_demo(settings, args.output_dir)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
