"""Checkpoint directory layout shared by the trainer, the converter and the evaluation tools.

See docs/checkpoint-format.md. Pure file-system code: no torch, no megatron import, so tools
can inspect a checkpoint (e.g. tell one of ours from an HF directory) in milliseconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megatron_longctx.atomic import write_text_atomic

FORMAT = "megatron-longctx-checkpoint/1"
META_NAME = "longctx_meta.json"
LATEST_NAME = "latest_checkpointed_iteration.txt"


def iter_dir(root: str | os.PathLike, iteration: int) -> Path:
    """ROOT/iter_NNNNNNN (Megatron-LM's naming)."""
    return Path(root) / f"iter_{iteration:07d}"


def write_meta(directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write longctx_meta.json (atomically) into an iteration directory; adds `format`."""
    path = Path(directory) / META_NAME
    write_text_atomic(path, json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True))
    return path


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """Read an iteration directory's longctx_meta.json; clear error when absent or foreign."""
    path = Path(directory) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory}: no {META_NAME}; not a megatron-longctx checkpoint directory"
        )
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def write_latest(root: str | os.PathLike, iteration: int) -> None:
    """Mark `iteration` as the newest complete checkpoint (call after the save finished)."""
    write_text_atomic(Path(root) / LATEST_NAME, f"{iteration}\n")


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The iteration named by the marker, or None when ROOT has no complete checkpoint."""
    path = Path(root) / LATEST_NAME
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8").strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number, found {text!r}") from None


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """Iteration directory to load from `path`: a root with a marker, or an iter_ dir itself.

    Returns None when `path` is a root without a complete checkpoint yet (a fresh run).
    """
    path = Path(path)
    if (path / META_NAME).is_file():
        return path
    iteration = latest_iteration(path)
    if iteration is None:
        return None
    directory = iter_dir(path, iteration)
    if not (directory / META_NAME).is_file():
        raise FileNotFoundError(
            f"{path / LATEST_NAME} names iteration {iteration} but {directory} is incomplete"
        )
    return directory


def is_longctx_checkpoint(path: str | os.PathLike) -> bool:
    """True for one of our checkpoint roots or iteration directories (vs an HF model dir)."""
    path = Path(path)
    return (path / META_NAME).is_file() or (path / LATEST_NAME).is_file()
