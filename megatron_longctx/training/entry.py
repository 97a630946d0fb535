"""`pretrain_longctx.py`'s body: flags -> validated config -> process groups -> loop -> exit code.

Everything that can be checked without a process group is checked first (flags, world size
against TP x PP x CP, batch divisibility, FP8 without TE), so a wrong launch fails in a second
with the flag named instead of after the model is built or inside a collective.
"""

from __future__ import annotations

import logging
import os
import sys

from megatron_longctx.config.training import parse_pretrain_args


def main(argv: list[str] | None = None) -> int:
    """Run the trainer; returns the process exit code (see pretrain_longctx.py)."""
    cfg = parse_pretrain_args(argv)
    from megatron_longctx.model.build import te_available
    from megatron_longctx.parallel.init import read_dist_env

    env = read_dist_env()
    try:
        cfg.validate(env.world_size, te_available=te_available())
    except ValueError as err:
        print(f"pretrain_longctx.py: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=os.environ.get("MEGATRON_LONGCTX_LOG_LEVEL", "WARNING"),
        format=f"[rank{env.rank}] %(levelname)s %(name)s: %(message)s",
    )
    from megatron_longctx.parallel.init import destroy_distributed, initialize_distributed
    from megatron_longctx.training.loop import pretrain

    initialize_distributed(cfg.parallel, seed=cfg.training.seed)
    try:
        result = pretrain(cfg)
    finally:
        destroy_distributed()
    return result.exit_code
