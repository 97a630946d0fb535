"""Checkpoint directory layout shared by the trainer, the converter and the evaluation tools.

See docs/checkpoint-format.md. Pure file-system code: no torch, no megatron import, so tools
can inspect a checkpoint (e.g. tell one of ours from an HF directory) in milliseconds.

Every failure to read the layout is a `CheckpointError` naming the file and what is wrong (a
marker that is not a number or names a missing iteration, an absent or invalid
`longctx_meta.json`); the tools and the trainer print it as one line and exit 2.
`checkpoint/integrity.py` adds the checks of the tensor files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megatron_longctx.atomic import write_text_atomic
from megatron_longctx.config.model import ModelConfig

FORMAT = "megatron-longctx-checkpoint/1"
META_NAME = "longctx_meta.json"
LATEST_NAME = "latest_checkpointed_iteration.txt"
#: Keys every longctx_meta.json has (the trainer's and the converter's).
REQUIRED_META_KEYS = ("iteration", "model")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or invalid.

    Attributes:
        path: the file (or directory) at fault.
        what: what is wrong with it, without the path.
    """

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path = str(path)
        self.what = what
        super().__init__(f"{path}: {what}")


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No (complete) checkpoint where one was expected; also a FileNotFoundError."""


def iter_dir(root: str | os.PathLike, iteration: int) -> Path:
    """ROOT/iter_NNNNNNN (Megatron-LM's naming)."""
    return Path(root) / f"iter_{iteration:07d}"


def write_meta(directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write longctx_meta.json (atomically) into an iteration directory; adds `format`."""
    path = Path(directory) / META_NAME
    write_text_atomic(path, json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True))
    return path


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """Read an iteration directory's longctx_meta.json.

    Raises:
        CheckpointNotFoundError: the file is absent.
        CheckpointError: unreadable, not JSON, not an object, another format, without
            `iteration` / `model`, or a `model` that is not a valid ModelConfig.
    """
    path = Path(directory) / META_NAME
    if not path.is_file():
        raise CheckpointNotFoundError(
            directory, f"no {META_NAME}; not a megatron-longctx checkpoint directory")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(path, f"cannot be read ({err})") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(path, f"invalid JSON ({err}); truncated or edited?") from None
    if not isinstance(meta, dict):
        raise CheckpointError(path, f"expected a JSON object, found {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(path, f"format {meta.get('format')!r}, expected {FORMAT!r}")
    missing = [key for key in REQUIRED_META_KEYS if key not in meta]
    if missing:
        raise CheckpointError(path, f"missing key(s) {missing}")
    if not isinstance(meta["model"], dict):
        raise CheckpointError(path, "`model` is not an object")
    model_config_of(meta, directory)  # every reader rebuilds it: fail here, naming the file
    return meta


def model_config_of(meta: dict[str, Any], directory: str | os.PathLike) -> ModelConfig:
    """The checkpoint's architecture (`meta["model"]`) as a validated ModelConfig.

    Raises:
        CheckpointError: naming longctx_meta.json, for unknown or inconsistent fields.
    """
    path = Path(directory) / META_NAME
    try:
        cfg = ModelConfig(**meta["model"])
        cfg.validate()
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(path, f"`model` does not describe a model ({err})") from None
    return cfg


def write_latest(root: str | os.PathLike, iteration: int) -> None:
    """Mark `iteration` as the newest complete checkpoint (call after the save finished)."""
    write_text_atomic(Path(root) / LATEST_NAME, f"{iteration}\n")


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The iteration named by the marker, or None when ROOT has no complete checkpoint."""
    path = Path(root) / LATEST_NAME
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(path, f"cannot be read ({err})") from None
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(path, f"expected an iteration number, found {text[:40]!r}") \
            from None
    if iteration < 0:
        raise CheckpointError(path, f"expected an iteration number, found {text!r}")
    return iteration


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """Iteration directory to load from `path`: a root with a marker, or an iter_ dir itself.

    Returns None when `path` is a root without a complete checkpoint yet (a fresh run).

    Raises:
        CheckpointError: the marker is invalid or names an iteration whose directory is missing
            or has no longctx_meta.json.
    """
    path = Path(path)
    if (path / META_NAME).is_file():
        return path
    iteration = latest_iteration(path)
    if iteration is None:
        return None
    directory = iter_dir(path, iteration)
    if not directory.is_dir():
        raise CheckpointError(path / LATEST_NAME,
                              f"names iteration {iteration} but {directory} does not exist")
    if not (directory / META_NAME).is_file():
        raise CheckpointError(path / LATEST_NAME, f"names iteration {iteration} but "
                              f"{directory} is incomplete (no {META_NAME})")
    return directory


def is_longctx_checkpoint(path: str | os.PathLike) -> bool:
    """True for one of our checkpoint roots or iteration directories (vs an HF model dir)."""
    path = Path(path)
    return (path / META_NAME).is_file() or (path / LATEST_NAME).is_file()
