#!/usr/bin/env python3
"""Long-context continual pretraining on megatron-core: parse, initialise, train, close.

Megatron-LM flag names (see `python pretrain_longctx.py --help` and docs/training.md). Launch
with torchrun or srun (one process per GPU); ranks come from the environment.

`--dry-run` prints the per-GPU memory and step-time estimate of the flags and exits (0 fits,
4 over --gpu-memory-gb) before any process group (megatron_longctx/plan, docs/slurm.md).

Exit codes: 0 done; 2 bad flags or inputs (one line naming the file); 3 NaN/Inf loss with
--on-nan-loss stop; 75 saved after SIGTERM/SIGUSR1 (--exit-signal-handler) or
--exit-duration-in-mins, or signalled before the first step (nothing to save): requeue to
continue.

SIGTERM/SIGUSR1 are recorded from the first statement on, before torch and megatron are
imported (~6 s), so a preemption signal during start-up cannot kill the rank
(megatron_longctx/training/signals.py).
"""

from __future__ import annotations

from megatron_longctx.training.signals import install_early

install_early()

import sys  # noqa: E402  (after the signal handler, on purpose)

from megatron_longctx.plan import dry_run  # noqa: E402
from megatron_longctx.training.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(dry_run.main() if dry_run.requested() else main())
