#!/usr/bin/env python3
"""The paper's data-mixture comparison: every strategy from one stage-1 checkpoint, side by side.

    python tools/ablate_mixture.py --output-dir ablation \
        --data-prefix 'data/slimpajama_*_text_document' --stage1-checkpoint ckpt/stage1 \
        --tokenizer-model tok --model-preset demo --short-length 64 --long-length 512
    python tools/demo.py --ablation --output-dir ablation_output   # `make ablation`: demo data

Plans each strategy (original, per-source, global, domain-upsample, cut), trains stage 2 for the
same tokens and seed through pretrain_longctx.py, evaluates the needle at --long-length and the
loss per domain on held-out documents, and audits the realised shares of the built training
index: report.md (the paper's Table 5 in miniature), results.json, plots/. A rerun resumes with
the strategies not done yet. Library: megatron_longctx/demo/ablation.py; numbers: docs/demo.md.
Exit codes: 0 done, 2 bad flags or inputs, otherwise the failing trainer's.
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
from megatron_longctx.demo.ablation import AblationSettings, run_ablation  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """``--output-dir`` plus one flag per `AblationSettings` field."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True,
                        help="results, plans and checkpoints of every strategy")
    add_config_flags(parser, AblationSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = config_from_namespace(AblationSettings, args)
    except ValueError as err:
        parser.error(str(err))
    try:
        result = run_ablation(settings, args.output_dir)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:
        print(f"\nablation: step failed (exit {err.returncode}): {' '.join(err.cmd)}",
              file=sys.stderr)
        return err.returncode or 1
    print("\n" + "\n".join(result.summary))
    print(f"\nreport: {result.paths.root / 'report.md'} "
          f"(numbers: {result.paths.root / 'results.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
