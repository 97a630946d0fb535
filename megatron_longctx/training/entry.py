"""`pretrain_longctx.py`'s body: flags -> validated config -> process groups -> loop -> exit code.

Everything that can be checked without a process group is checked first (flags, world size
against TP x PP x CP, batch divisibility, FP8 without TE), so a wrong launch fails in a second
with the flag named instead of after the model is built or inside a collective.
"""

from __future__ import annotations

import logging
import os
import sys

from megatron_longctx.config.training import build_pretrain_parser, config_from_args
from megatron_longctx.parallel.init import set_cuda_connections


def main(argv: list[str] | None = None) -> int:
    """Run the trainer; returns the process exit code (see pretrain_longctx.py)."""
    parser = build_pretrain_parser()
    args = parser.parse_args(argv)
    # First, before anything can create a CUDA context: resolving the default
    # --transformer-impl and te_available() below import Transformer Engine.
    set_cuda_connections(args.tensor_model_parallel_size, args.context_parallel_size)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
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
