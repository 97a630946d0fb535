#!/usr/bin/env python3
"""The paper's data-mixture comparison: every arm from one stage-1 checkpoint, over seeds.

    python tools/ablate_mixture.py --output-dir ablation \
        --data-prefix 'data/slimpajama_*_text_document' --stage1-checkpoint ckpt/stage1 \
        --tokenizer-model tok --model-preset demo --short-length 64 --long-length 512
    python tools/demo.py --ablation --output-dir ablation_output   # `make ablation`: demo data

Plans each arm (original; per-source, the released keep-ratio rule, --short-keep-ratio 0.1;
per-source-target, the --long-fraction target; global with --short-keep-ratio; domain-upsample;
cut), trains stage 2 for the same tokens through pretrain_longctx.py, evaluates the needle at
--needle-lengths x --needle-depths and the loss per domain on held-out documents, and audits the
realised shares of the built training index, once per seed (--seeds 3: --seed, --seed+1, ...;
plan, trainer, audit and needle draws; stage 1 shared). report.md (the paper's Table 5 in
miniature: mean [95% Student-t interval] over seeds, per-source vs each arm paired by seed),
results.json (`summary`, and every seed's rows under `seeds`), plots/. A rerun resumes with the
(seed, arm) runs not done yet; a rerun with more --seeds extends the results. Library:
megatron_longctx/demo/ablation.py; numbers: docs/demo.md. Exit codes: 0 done, 2 bad flags or
inputs, otherwise the failing trainer's.
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
                        help="results, plans and checkpoints of every arm and seed")
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
