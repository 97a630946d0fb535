"""`pretrain_longctx.py`'s body: flags -> resolved, validated config -> process groups -> loop.

Everything that can be checked without a process group is checked first (flags, world size
against TP x PP x CP, batch divisibility, FP8 without TE, the vocabulary against
--padded-vocab-size), so a wrong launch fails in a second with the flag named instead of after
the model is built or inside a collective. Order matters in one place:
CUDA_DEVICE_MAX_CONNECTIONS is exported before anything can import Transformer Engine (the
`te_available()` probe resolving the default --transformer-impl does), because the CUDA driver
reads it once, when the context is created.

The config is resolved (transformer implementation, the tokenizer's vocabulary) into a new
object and then validated; nothing replaces it afterwards. The datasets named by --data-path
(and the blend files) are checked here too, before any process group exists.

Bad input ends the same way wherever it is found: one line `pretrain_longctx.py: error:
FILE: what is wrong` on stderr (rank 0), exit 2, no traceback. That covers bad flags, missing
or truncated datasets, and checkpoints that are damaged (`CheckpointError`: marker, metadata,
truncated `.distcp` / `common.pt` / `.metadata`, checked on every rank before any collective
read) or do not fit the run (`CheckpointMismatchError`).

Signals: pretrain_longctx.py installs the SIGTERM/SIGUSR1 recorder before importing this module
(training/signals.py); `main` hands it to the loop, or, without --exit-signal-handler, restores
the default handlers (a recorded signal is then delivered).
"""

from __future__ import annotations

import logging
import os
import sys

from megatron_longctx.config.training import (
    PretrainConfig,
    build_pretrain_parser,
    config_from_args,
    resolve_runtime,
)
from megatron_longctx.parallel.init import set_cuda_connections
from megatron_longctx.training import signals


def _resolved_config(argv: list[str] | None, world_size: int) -> tuple[PretrainConfig, object]:
    """(resolved and validated config, its tokenizer); ValueError names the flag."""
    from megatron_longctx.model import build

    parser = build_pretrain_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    # First, before anything can create a CUDA context: te_available() imports TE.
    set_cuda_connections(cfg.parallel.tensor_model_parallel_size,
                         cfg.parallel.context_parallel_size)
    have_te = build.te_available()
    version = build.te_version() if have_te else None
    cfg.validate(world_size, te_available=have_te, te_version=version)  # flags alone
    from megatron_longctx.training.checkpointing import check_checkpoint_to_load
    from megatron_longctx.training.compat import reconcile_inputs
    from megatron_longctx.training.data import check_data_files, resolve_tokenizer

    check_data_files(cfg)
    check_checkpoint_to_load(cfg.checkpoint.load)
    tokenizer = resolve_tokenizer(cfg)
    cfg = reconcile_inputs(cfg, args, tokenizer)
    resolved = resolve_runtime(cfg, te_available=have_te, tokenizer_vocab=tokenizer.vocab_size)
    resolved.validate(world_size, te_available=have_te, te_version=version)
    return resolved, tokenizer


def _error(message: object) -> int:
    print(f"pretrain_longctx.py: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the trainer; returns the process exit code (see pretrain_longctx.py)."""
    from megatron_longctx.checkpoint.meta import CheckpointError
    from megatron_longctx.parallel.init import read_dist_env
    from megatron_longctx.training.checkpointing import CheckpointMismatchError

    env = read_dist_env()
    try:
        cfg, tokenizer = _resolved_config(argv, env.world_size)
    except (ValueError, FileNotFoundError) as err:
        return _error(err)
    flag = signals.EARLY if signals.EARLY.installed else None
    if flag is not None and not cfg.training.exit_signal_handler:
        signals.release_early()
        flag = None
    logging.basicConfig(
        level=os.environ.get("MEGATRON_LONGCTX_LOG_LEVEL", "WARNING"),
        format=f"[rank{env.rank}] %(levelname)s %(name)s: %(message)s",
    )
    from megatron_longctx.parallel.init import destroy_distributed, initialize_distributed
    from megatron_longctx.training.loop import pretrain

    initialize_distributed(cfg.parallel, seed=cfg.training.seed,
                           timeout_minutes=cfg.training.distributed_timeout_minutes)
    try:
        result = pretrain(cfg, tokenizer=tokenizer, signal_flag=flag)
    except (CheckpointMismatchError, CheckpointError) as err:
        # Both are raised alike on every rank (checked before any collective read); one line.
        return _error(err) if env.rank == 0 else 2
    finally:
        if flag is not None:
            signals.ignore_late()
        destroy_distributed()
    return result.exit_code
