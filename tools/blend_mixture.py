#!/usr/bin/env python3
"""Per-domain stats -> mixture plan, Megatron blend files (views), report.md with plots.

    python tools/blend_mixture.py --data-prefix 'data/slimpajama_*_text_document' \
        --output-dir mix --strategy per-source --long-fraction 0.7 \
        --train-tokens 5e9 --seq-length 81920 [--audit]

Reads the stats files for the plan, checked against their .idx/.bin (and the .idx files for
the held-out tail and the views); see
megatron_longctx/mixture/planner.py for the strategies' definitions. Exit 2 with one line on
bad flags or data (including a budget too small for `--audit` to build the training index),
3 when the audit finds realized shares off the plan by more than 1%.
"""

import sys

from megatron_longctx.config.cli import parse_mixture_args
from megatron_longctx.mixture.outputs import write_plan_outputs
from megatron_longctx.mixture.planner import PlanError, plan_mixture
from megatron_longctx.mixture.report import dumps_table


def main(argv: list[str] | None = None) -> int:
    cfg, audit = parse_mixture_args(argv)
    try:
        plan = plan_mixture(cfg)
        paths = write_plan_outputs(plan, cfg.output_dir)
    except (PlanError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(dumps_table(plan))
    for name, path in paths.items():
        print(f"{name}: {path}")
    if audit:
        from megatron_longctx.mixture.audit import audit_plan, format_audit

        try:
            result = audit_plan(paths["plan"])
        except (OSError, ValueError) as err:
            print(f"error: --audit: {err}", file=sys.stderr)
            return 2
        print(format_audit(result))
        if not result["within_tolerance"]:
            print(f"error: realized shares differ from the plan by more than "
                  f"{result['tolerance']:.1%}", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
