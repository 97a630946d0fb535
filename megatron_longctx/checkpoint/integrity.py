"""Checks that a checkpoint directory's files are complete before any tensor is read.

torch.distributed.checkpoint and megatron's `common.pt` loader fail on a damaged file with
errors that do not say which file (a bare `EOFError` from a truncated `.distcp`, a zip error
from a truncated `common.pt`, an unpickling error from a truncated `.metadata`), and some only
on the ranks that read the damaged shard, leaving the others waiting in a collective. So every
loader first calls `open_checkpoint`, which checks, identically on every rank and without
reading tensor data:

| file | check |
|---|---|
| `latest_checkpointed_iteration.txt` | a number naming an existing, complete iteration (meta.py) |
| `longctx_meta.json` | JSON object of our format with `iteration` and a valid `model` (meta.py) |
| `metadata.json` | megatron's backend description: a JSON object with `sharded_backend` |
| `common.pt` | present and a complete zip archive (torch.save's format; CRCs checked) |
| `.metadata` | torch.distributed.checkpoint's index unpickles |
| `*.distcp` | every file the index names exists and holds the byte ranges the index records |

(A truncated shard is named with its size and the size the index needs.)

Cost: one stat per shard file plus reading `.metadata` and `common.pt` (kilobytes to a few MB
for a 7B model), milliseconds next to a load. What the checks cannot see (a flipped byte inside
a tensor) is caught by `guarded_read`, which turns any failure of the underlying loaders into a
`CheckpointError` naming the directory and the original error.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_longctx.checkpoint.meta import (
    CheckpointError,
    CheckpointNotFoundError,
    read_meta,
    resolve_checkpoint,
)

MEGATRON_METADATA = "metadata.json"
COMMON_NAME = "common.pt"
DCP_METADATA = ".metadata"


def _check_megatron_metadata(directory: Path) -> None:
    path = directory / MEGATRON_METADATA
    if not path.is_file():
        raise CheckpointError(path, "missing: not a dist_checkpointing directory (torn save?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(path, f"invalid JSON ({err}); truncated or edited?") from None
    if not isinstance(data, dict) or "sharded_backend" not in data:
        raise CheckpointError(path, "not megatron's dist_checkpointing metadata (no "
                              "sharded_backend)")


def _check_common(directory: Path) -> None:
    path = directory / COMMON_NAME
    if not path.is_file():
        raise CheckpointError(path, "missing (torn save?)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise CheckpointError(path, f"truncated or corrupt ({err})") from None
    if bad is not None:
        raise CheckpointError(path, f"corrupt: CRC mismatch in member {bad}")


def _read_dcp_metadata(directory: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    path = directory / DCP_METADATA
    if not path.is_file():
        raise CheckpointError(path, "missing: no tensor index (torn save?)")
    try:
        return FileSystemReader(str(directory)).read_metadata()
    except Exception as err:  # noqa: BLE001 (unpickling fails in many ways on a damaged file)
        raise CheckpointError(path, f"truncated or corrupt ({type(err).__name__}: "
                              f"{_first_line(err)})") from None


def shard_extents(storage_data: dict[Any, Any]) -> dict[str, int]:
    """Bytes each shard file must hold: the end of the last byte range the index puts in it."""
    ends: dict[str, int] = {}
    for info in storage_data.values():
        end = int(info.offset) + int(info.length)
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), end)
    return ends


def _check_shards(directory: Path) -> None:
    metadata = _read_dcp_metadata(directory)
    for name, need in sorted(shard_extents(metadata.storage_data or {}).items()):
        path = directory / name
        if not path.is_file():
            raise CheckpointError(path, f"missing: {DCP_METADATA} lists it (torn save or "
                                  "deleted file)")
        size = path.stat().st_size
        if size < need:
            raise CheckpointError(path, f"truncated: {size} bytes, the tensor index needs "
                                  f"{need}")


def check_checkpoint_files(directory: str | os.PathLike) -> None:
    """Check an iteration directory's tensor files (table in the module docstring).

    Raises:
        CheckpointError: naming the first damaged file and what is wrong.
    """
    directory = Path(directory)
    _check_megatron_metadata(directory)
    _check_common(directory)
    _check_shards(directory)


def open_checkpoint(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Resolve `path` (a root or an iteration directory), read and check everything.

    Returns:
        (iteration directory, its longctx_meta.json).

    Raises:
        CheckpointNotFoundError: `path` holds no complete checkpoint.
        CheckpointError: a damaged marker, metadata or tensor file (named).
    """
    if not Path(path).exists():
        raise CheckpointNotFoundError(path, "does not exist")
    directory = resolve_checkpoint(path)
    if directory is None:
        raise CheckpointNotFoundError(path, "no complete checkpoint (no longctx_meta.json and "
                                      "no latest_checkpointed_iteration.txt)")
    meta = read_meta(directory)
    check_checkpoint_files(directory)
    return directory, meta


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no message"


@contextlib.contextmanager
def guarded_read(directory: str | os.PathLike, what: str = "cannot be loaded") -> Iterator[None]:
    """Turn any failure of a checkpoint reader inside the block into a CheckpointError.

    For damage the file checks cannot see; errors that already name their file
    (CheckpointError) pass through unchanged.
    """
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 (the readers raise anything on bad bytes)
        raise CheckpointError(directory, f"{what} ({type(err).__name__}: "
                              f"{_first_line(err)})") from err
