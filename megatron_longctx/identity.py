"""Content identity of inputs, the one helper every resumable stage uses to decide whether a
result on disk was made from what a rerun reads now.

A path, a size or a modification time does not identify content: a checkpoint re-converted
at the same path, a stage-1 checkpoint retrained in place or a haystack file edited keep
their paths (and often their sizes), and a `touch` or a copy changes the mtime of identical
bytes. So a result records the sha256 of what it read, and a rerun compares it:
preprocessing (each input file), needle and RULER cells (model weights, haystack and task
files), the ablation (stage-1 checkpoint and datasets).

Cost: sha256 streams at ~1 GB/s on one core, so a 7B bf16 checkpoint (13.5 GB) takes ~15 s
once per run start, next to minutes (needle) to hours (RULER, ablation) of evaluation.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: Temporary files of atomic writes (`atomic.temporary_sibling`): never part of a result's input.
_TEMPORARY_MARK = ".tmp-"


def file_sha256(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    """sha256 of a file's bytes (streamed; ~1 GB/s, a few % of tokenizing the same bytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory's files (each file's relative path and sha256, in
    sorted order, so renaming, adding or editing any file changes it; temporary files of
    atomic writes are left out).

    Raises:
        FileNotFoundError: `path` does not exist.
    """
    root = Path(path)
    if root.is_file():
        return file_sha256(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or directory")
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and _TEMPORARY_MARK not in p.name)
    for file in files:
        digest.update(f"{file.relative_to(root).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()
