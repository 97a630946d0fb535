#!/usr/bin/env python3
"""Long-context continual pretraining on megatron-core: parse, initialise, train, close.

Megatron-LM flag names (see `python pretrain_longctx.py --help` and docs/training.md). Launch
with torchrun or srun (one process per GPU); ranks come from the environment.

Exit codes: 0 done; 2 bad flags; 3 NaN/Inf loss with --on-nan-loss stop; 75 saved after
SIGTERM/SIGUSR1 (--exit-signal-handler) or --exit-duration-in-mins: requeue to continue.
"""

from __future__ import annotations

import sys

from megatron_longctx.training.entry import main

if __name__ == "__main__":
    sys.exit(main())
