"""Atomic file output, the one helper every stage uses: write a temporary file beside the
target, fsync it, rename it over the target. A reader (or a rerun after a kill) sees the old
file or the new one, never half of one; a crash leaves at most a `*.tmp-*` file behind.

The temporary name carries the process id and a random suffix, so concurrent writers of the
same target (SLURM array tasks, TP ranks) cannot clobber each other's temporary file; the last
rename wins. Cost: one fsync per file (~1-5 ms on local disk), negligible next to what these
files describe.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A unique temporary path in the target's directory (same file system: rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write (by any library: matplotlib, numpy, torch ...); it is
    renamed to `path` when the block exits normally and removed when it raises."""
    tmp = temporary_sibling(path)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, payload: Any, *, indent: int | None = 1,
                      sort_keys: bool = False) -> None:
    """Write `payload` as JSON (plus a final newline) to `path` atomically."""
    write_text_atomic(path, json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")
