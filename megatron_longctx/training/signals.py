"""Preemption signals (SIGTERM, SIGUSR1) recorded instead of killing the trainer.

Slurm sends USR1 before the time limit (`--signal=B:USR1@300`, forwarded by the batch script)
and TERM on preemption or scancel. Python's default for both is to die (exit 138 / 143), so a
signal that arrives while the trainer is still starting (imports take ~6 s, process groups,
data and checkpoint loading minutes at scale) used to fail the job instead of requeueing it.

`install_early()` is the first statement of pretrain_longctx.py, before torch or megatron is
imported: from then on a signal is only recorded, in `EARLY`. The entrypoint hands `EARLY` to
the training loop, which honours a pending signal at its first step boundary: with nothing
trained yet it exits with the requeue code without saving (the loaded checkpoint stays the
latest), otherwise it saves first (training/loop.py). Without `--exit-signal-handler` the
entrypoint restores the default handlers and re-delivers a recorded signal (Megatron-LM's
behaviour: the signal kills the process).

This module imports only the standard library.
"""

from __future__ import annotations

import os
import signal
from typing import Any

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class SignalFlag:
    """Records SIGTERM/SIGUSR1 instead of dying; the loop saves at the next step boundary."""

    SIGNALS = PREEMPTION_SIGNALS

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        """True while this flag's handlers are in place."""
        return bool(self._previous)

    def install(self) -> None:
        """Record the signals from now on (idempotent)."""
        for sig in self.SIGNALS:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def restore(self) -> None:
        """Put back the handlers that were in place before `install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


#: The process-wide flag of the trainer's entrypoint (installed by `install_early`).
EARLY = SignalFlag()


def install_early() -> SignalFlag:
    """Record preemption signals from this moment on (first line of the entrypoint)."""
    EARLY.install()
    return EARLY


def ignore_late() -> None:
    """Once the loop has returned: ignore further preemption signals until the process ends.

    The batch script may send a second copy of a signal (its resend covers srun's start-up
    window); one arriving while the interpreter shuts down would kill the process with the
    default action (CPython resets Python-level handlers to SIG_DFL at finalization, but keeps
    SIG_IGN), turning a saved exit 75 into 138 and losing the requeue decision."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def release_early() -> None:
    """Without --exit-signal-handler: default handlers again, and a recorded signal is
    delivered now, with its default effect."""
    pending = EARLY.received
    EARLY.restore()
    EARLY.received = None
    if pending is not None:
        signal.signal(pending, signal.SIG_DFL)
        os.kill(os.getpid(), pending)
