"""`pretrain_longctx.py --dry-run`: the planner's estimate for the run's own flags.

Runs before any process group, model or data file (pretrain_longctx.py dispatches here when
the flag is present): parse the trainer's flags, validate them as the trainer would (the
data and tokenizer files are the trainer's to check), print the per-GPU memory and step-time
estimate, exit 0 when it fits --gpu-memory-gb and `EXIT_OVER_MEMORY` (4) when it does not,
with the layouts that fit (examples/train_128k.sh refuses the layout on 4 only; 2 is a bad
flag, as for the trainer).
"""

from __future__ import annotations

import os
import sys

from megatron_longctx.config.model import validate_all
from megatron_longctx.config.training import parse_pretrain_args
from megatron_longctx.parallel.init import read_dist_env
from megatron_longctx.plan.inputs import layout_from_config, trainer_model
from megatron_longctx.plan.report import dry_run_report

#: --dry-run's exit code when the layout is estimated over --gpu-memory-gb.
EXIT_OVER_MEMORY = 4


def requested(argv: list[str] | None = None) -> bool:
    """True when the command line asks for --dry-run."""
    return "--dry-run" in (sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> int:
    """Print the estimate for the flags in `argv`; returns the exit code (module doc)."""
    cfg = parse_pretrain_args(argv)
    world = cfg.plan.plan_world_size or read_dist_env().world_size
    # A GPU run: Transformer Engine (or auto) asked for, or a GPU on this machine.
    cuda = cfg.precision.transformer_impl != "local" or os.path.exists("/dev/nvidiactl")
    layout = layout_from_config(cfg, world, cuda=cuda)
    try:  # the flags only: data and tokenizer files are the trainer's to check
        validate_all(cfg.model, cfg.parallel, cfg.precision, world_size=world,
                     te_available=layout.impl == "transformer_engine")
        cfg.training.validate()
        cfg.plan.validate()
    except ValueError as err:
        print(f"pretrain_longctx.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    text, fits = dry_run_report(trainer_model(cfg), layout, cfg.plan)
    print(text, flush=True)
    return 0 if fits else EXIT_OVER_MEMORY
