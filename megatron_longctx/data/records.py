"""Reading SlimPajama-style jsonl(.gz/.zst) into validated document records.

One record per JSON line: `{"text": ..., "meta": {"redpajama_set_name": ...}}`. Reading is split
into two small steps that the preprocessing executor composes:

1. `iter_lines(path)` yields `(line_number, raw_bytes)` from plain, gzip or zstd files and raises
   `TruncatedInputError` (with the last good line number) when a compressed stream ends early.
   The `zstandard` stream reader returns silently on a truncated frame, so zstd is decoded with
   a frame-aware decompressobj loop that checks every frame reached its end marker.
2. `parse_record(line, ...)` turns one line into a `Record` or a `BadRecord` with a reason from
   `BAD_REASONS`; nothing here raises on bad data, the caller decides (count or `--on-error fail`).

Text fields may be a string or, as Megatron-LM accepts, a list of already split sentences.
"""

from __future__ import annotations

import glob
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import zstandard

#: What a directory scan picks up (SlimPajama's layout). Files named explicitly or by a glob may
#: have any name (Megatron users often call jsonl files .json).
INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")

#: Why a record was skipped. `truncated_file` ends the file it occurs in; the others skip one line.
BAD_REASONS = (
    "invalid_json",
    "invalid_utf8",
    "missing_key",
    "not_string",
    "empty_text",
    "empty_after_tokenization",
    "truncated_file",
)

_READ_CHUNK = 1 << 20
# A JSON \u escape of a UTF-16 surrogate: the only way a lone surrogate (not encodable as UTF-8,
# rejected by tokenizers) can reach a Python str from valid UTF-8 bytes.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class TruncatedInputError(Exception):
    """A compressed input ended before its end-of-stream marker (or is corrupt)."""

    def __init__(self, path: str, line: int, detail: str) -> None:
        super().__init__(f"{path}:{line}: truncated or corrupt compressed input ({detail})")
        self.path = path
        self.line = line
        self.detail = detail


@dataclass(frozen=True)
class Record:
    """One valid document: its domain (or None) and one text per json key."""

    line: int
    domain: str | None
    texts: tuple[str | list[str], ...]
    num_bytes: int


@dataclass(frozen=True)
class BadRecord:
    """A skipped line: where, why, and a short detail for the log."""

    path: str
    line: int
    reason: str
    detail: str

    def location(self) -> str:
        return f"{self.path}:{self.line}"


def _walk_inputs(directory: str) -> list[str]:
    """Input files under a directory: recursive, names ending in `INPUT_SUFFIXES`, skipping
    hidden files and directories (`.cache/`, `._x.jsonl` from macOS, editor swap files)."""
    matches = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        matches += [os.path.join(root, name) for name in names
                    if name.endswith(INPUT_SUFFIXES) and not name.startswith(".")]
    return matches


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Expand files, globs and directories into a sorted, de-duplicated list of input files.

    Directories are searched recursively for names ending in one of `INPUT_SUFFIXES`, skipping
    hidden names. Files reached twice (a symlink to a file already listed, or the same file
    under two patterns) are read once: of the paths resolving to one file, the one that is not
    a symlink is kept (else the first in sorted order). Sorting makes the order (and so every
    output byte) independent of the file system's listing order.

    Raises:
        FileNotFoundError: naming `--input` and the pattern that matched nothing.
    """
    found: set[str] = set()
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = _walk_inputs(pattern)
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"--input {pattern!r}: no such file, directory or glob match")
        found.update(os.path.normpath(m) for m in matches)
    by_target: dict[str, str] = {}
    for path in sorted(found, key=lambda p: (os.path.islink(p), p)):  # real files first
        by_target.setdefault(os.path.realpath(path), path)
    return sorted(by_target.values())


def _zstd_chunks(fh) -> Iterator[bytes]:
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    in_frame = False
    while True:
        data = fh.read(_READ_CHUNK)
        if not data:
            break
        while data:
            in_frame = True
            out = dobj.decompress(data)
            if out:
                yield out
            if dobj.eof:
                in_frame = False
                data = dobj.unused_data
                dobj = dctx.decompressobj()
            else:
                data = b""
    if in_frame:
        raise zstandard.ZstdError("stream ended inside a zstd frame")


def _gzip_chunks(fh) -> Iterator[bytes]:
    """Streamed like zstd (gzip.GzipFile.read raises before returning a truncated tail)."""
    dobj = zlib.decompressobj(wbits=31)
    in_member = False
    while True:
        data = fh.read(_READ_CHUNK)
        if not data:
            break
        while data:
            in_member = True
            out = dobj.decompress(data)
            if out:
                yield out
            if dobj.eof:
                in_member = False
                data = dobj.unused_data
                dobj = zlib.decompressobj(wbits=31)
            else:
                data = b""
    if in_member:
        raise EOFError("compressed file ended before the end-of-stream marker was reached")


def _plain_chunks(fh) -> Iterator[bytes]:
    while True:
        data = fh.read(_READ_CHUNK)
        if not data:
            return
        yield data


def iter_blocks(path: str, block_bytes: int = _READ_CHUNK) -> Iterator[tuple[int, bytes]]:
    """Yield `(first_line_number, block)`: decompressed bytes cut at line ends, ~block_bytes each.

    Cutting whole lines in the reading process and parsing them in workers keeps the reader's
    per-byte work to a memchr, so one reader feeds many workers.

    Raises:
        TruncatedInputError: the compressed stream is cut or corrupt; every complete line before
            the cut was yielded first, `line` is the line the cut is in (the first incomplete
            one: after N complete lines, line N + 1).
    """
    parts: list[bytes] = []
    size = 0
    next_line = 1
    with open(path, "rb") as fh:
        if path.endswith(".zst"):
            chunks = _zstd_chunks(fh)
        elif path.endswith(".gz"):
            chunks = _gzip_chunks(fh)
        else:
            chunks = _plain_chunks(fh)
        try:
            for chunk in chunks:
                parts.append(chunk)
                size += len(chunk)
                if size < block_bytes:
                    continue
                pending = b"".join(parts)
                start = 0
                while len(pending) - start >= block_bytes:
                    cut = pending.find(b"\n", start + block_bytes - 1) + 1
                    if not cut:
                        break
                    yield next_line, pending[start:cut]
                    next_line += pending.count(b"\n", start, cut)
                    start = cut
                parts = [pending[start:]]
                size = len(parts[0])
        except (EOFError, OSError, zlib.error, zstandard.ZstdError) as err:
            pending = b"".join(parts)
            cut = pending.rfind(b"\n") + 1  # the cut line itself is incomplete: dropped
            if cut:
                yield next_line, pending[:cut]
                next_line += pending.count(b"\n", 0, cut)
            raise TruncatedInputError(path, next_line, str(err)) from err
    pending = b"".join(parts)
    if pending:
        yield next_line, pending


def split_block(first_line: int, block: bytes) -> Iterator[tuple[int, bytes]]:
    """(line_number, line) for each line of a block from `iter_blocks`."""
    lines = block.split(b"\n")
    if block.endswith(b"\n"):
        lines.pop()
    return zip(range(first_line, first_line + len(lines)), lines)


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """Yield `(line_number, line_bytes)` of a .jsonl, .jsonl.gz or .jsonl.zst file.

    Raises:
        TruncatedInputError: as `iter_blocks`, after the complete lines before the cut.
    """
    for first_line, block in iter_blocks(path):
        yield from split_block(first_line, block)


def lookup_dotted(obj: object, dotted: str) -> tuple[bool, object]:
    """Return (found, value) for a dotted path such as `meta.redpajama_set_name`."""
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return False, None
        obj = obj[part]
    return True, obj


def parse_record(
    path: str,
    line_no: int,
    raw: bytes,
    json_keys: Sequence[str],
    domain_key: str | None,
) -> Record | BadRecord | None:
    """Validate one jsonl line. Returns None for a blank line (not a record, not an error)."""
    if not raw.strip():
        return None

    def bad(reason: str, detail: str) -> BadRecord:
        return BadRecord(path, line_no, reason, detail)

    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return bad("invalid_utf8", f"byte {err.start}: {err.reason}")
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        return bad("invalid_json", f"{err.msg} at column {err.colno}")
    if not isinstance(data, dict):
        return bad("invalid_json", f"expected a JSON object, got {type(data).__name__}")

    domain = None
    if domain_key is not None:
        found, value = lookup_dotted(data, domain_key)
        if not found:
            return bad("missing_key", f"no {domain_key!r} (--domain-key)")
        if not isinstance(value, str) or not value:
            return bad("not_string", f"{domain_key!r} is {type(value).__name__}, not a string")
        domain = value

    texts: list[str | list[str]] = []
    for key in json_keys:
        if key not in data:
            return bad("missing_key", f"no {key!r} (--json-keys)")
        text = data[key]
        if isinstance(text, str):
            if not text:
                return bad("empty_text", f"{key!r} is empty")
        elif isinstance(text, list) and all(isinstance(s, str) for s in text):
            if not any(text):
                return bad("empty_text", f"{key!r} is an empty sentence list")
        else:
            return bad("not_string", f"{key!r} is {type(text).__name__}, not a string")
        texts.append(text)

    if _SURROGATE_ESCAPE.search(raw):
        for text in texts:
            for piece in [text] if isinstance(text, str) else text:
                try:
                    piece.encode("utf-8")
                except UnicodeEncodeError as err:
                    return bad("invalid_utf8", f"lone surrogate at character {err.start}")
    return Record(line_no, domain, tuple(texts), len(raw) + 1)


def safe_domain_name(domain: str) -> str:
    """A file-name-safe form of a domain value (`RedPajamaC4` stays as is)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", domain).strip("._") or "_"
