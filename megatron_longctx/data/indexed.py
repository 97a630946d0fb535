"""Megatron indexed datasets (.bin/.idx): a streaming, crash-safe writer and a small reader.

The byte format is megatron.core.datasets.indexed_dataset's (tests compare our bytes with its
`IndexedDatasetBuilder` and read ours back with its `IndexedDataset`):

    .idx = b"MMIDIDX\\x00\\x00" | <Q version=1 | <B dtype code | <Q sequence_count
           | <Q document_count (= documents + 1) | int32 sequence_lengths[sequence_count]
           | int64 sequence_pointers[sequence_count] (byte offsets into .bin)
           | int64 document_indices[document_count] (sequence index where each document ends,
             starting with 0)
    .bin = the tokens, back to back, in the dtype (uint16 when vocab < 65500, else int32)

Unlike Megatron's builder, which keeps Python lists of every length (~36 bytes per document once
ints leave the small-int cache), we keep numpy chunks (4-8 bytes per entry), and we never expose a
half-written pair: tokens go to `{prefix}.bin.tmp`, the index to `{prefix}.idx.tmp`; `finalize`
removes any old `.idx` first, then renames `.bin` and finally `.idx`. A reader needs both names,
so a kill at any moment leaves either the previous complete pair, no pair, or the new one.

Reading is strict: `read_index` checks the header, the array sizes against the file size and
the document index's shape, and raises `DatasetError` naming the file and what is wrong (a
truncated .idx used to surface as a bare `struct.error` or numpy ValueError); `check_dataset`
adds the .bin: its size must be the index's tokens times the dtype size (a truncated .bin is
otherwise found only when training reads past its end). Both cost one read of the .idx (12
bytes per sequence) and a stat of the .bin, never a read of the tokens.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_longctx.identity import file_sha256  # noqa: F401  (re-exported)

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


class DatasetError(ValueError):
    """A dataset file that is missing, truncated or inconsistent; the message names the file."""


def optimal_dtype(vocab_size: int | None) -> np.dtype:
    """Megatron's rule: uint16 when the vocabulary is below 65500 tokens, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def _fsync_and_close(fh) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


class IndexedDatasetWriter:
    """Append documents as arrays; `finalize()` publishes `{prefix}.bin/.idx` atomically."""

    def __init__(self, prefix: str, dtype: np.dtype) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin_tmp = bin_path(prefix) + ".tmp"
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 (closed in finalize/abort)
        self._seq_lengths: list[np.ndarray] = []
        self._seqs_per_doc: list[np.ndarray] = []
        self.num_tokens = 0

    def add_documents(
        self, tokens: np.ndarray, sequence_lengths: np.ndarray, sequences_per_document: np.ndarray
    ) -> None:
        """Append documents given as one token array split into sequences, grouped in documents.

        Args:
            tokens: all tokens of the documents, in order.
            sequence_lengths: tokens per sequence (sums to len(tokens)).
            sequences_per_document: sequences per document (sums to len(sequence_lengths));
                a document is one sequence unless sentences were split.
        """
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {self.dtype} in {self.prefix}")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._seq_lengths.append(np.asarray(sequence_lengths, dtype=np.int32))
        self._seqs_per_doc.append(np.asarray(sequences_per_document, dtype=np.int64))
        self.num_tokens += int(tokens.size)

    def add_index(self, prefix: str) -> None:
        """Append a whole existing dataset (used to merge shards); streams its .bin."""
        index = read_index(prefix)
        if index.dtype != self.dtype:
            raise ValueError(f"{idx_path(prefix)}: dtype {index.dtype} differs from {self.dtype}")
        self._seq_lengths.append(index.sequence_lengths.astype(np.int32))
        self._seqs_per_doc.append(np.diff(index.document_indices).astype(np.int64))
        with open(bin_path(prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, length=16 << 20)
        self.num_tokens += int(index.sequence_lengths.sum(dtype=np.int64))

    def sequence_lengths(self) -> np.ndarray:
        return _concat(self._seq_lengths, np.int32)

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (sum over its sequences)."""
        seq = self.sequence_lengths().astype(np.int64)
        per_doc = _concat(self._seqs_per_doc, np.int64)
        ends = np.cumsum(per_doc)
        csum = np.concatenate([[0], np.cumsum(seq)])
        return csum[ends] - csum[ends - per_doc]

    @property
    def num_documents(self) -> int:
        return int(sum(a.size for a in self._seqs_per_doc))

    def index_bytes(self) -> bytes:
        seq = self.sequence_lengths()
        itemsize = self.dtype.itemsize
        pointers = np.zeros(seq.size, dtype=np.int64)
        if seq.size:
            np.cumsum(seq[:-1].astype(np.int64) * itemsize, out=pointers[1:])
        per_doc = _concat(self._seqs_per_doc, np.int64)
        return index_bytes(self.dtype, seq, pointers, np.concatenate([[0], np.cumsum(per_doc)]))

    def finalize(self) -> dict[str, Any]:
        """Write the index and publish the pair (old .idx removed first, new .idx renamed last).

        Returns the published pair's identity (`index_identity`), for the stats file.
        """
        _fsync_and_close(self._bin)
        idx_tmp = idx_path(self.prefix) + ".tmp"
        data = self.index_bytes()
        with open(idx_tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.exists(idx_path(self.prefix)):
            os.unlink(idx_path(self.prefix))
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(idx_tmp, idx_path(self.prefix))
        return {"idx_bytes": len(data), "idx_sha256": hashlib.sha256(data).hexdigest(),
                "bin_bytes": self.num_tokens * self.dtype.itemsize}

    def abort(self) -> None:
        """Close and delete the temporary files (outputs of earlier runs stay untouched)."""
        if not self._bin.closed:
            self._bin.close()
        for path in (self._bin_tmp, idx_path(self.prefix) + ".tmp"):
            if os.path.exists(path):
                os.unlink(path)


def index_bytes(
    dtype: np.dtype,
    sequence_lengths: np.ndarray,
    sequence_pointers: np.ndarray,
    document_indices: np.ndarray,
) -> bytes:
    """The bytes of a .idx file (pointers are byte offsets into the .bin, in any order)."""
    return b"".join(
        [
            INDEX_MAGIC,
            struct.pack("<Q", INDEX_VERSION),
            struct.pack("<B", _DTYPE_CODES[np.dtype(dtype)]),
            struct.pack("<Q", len(sequence_lengths)),
            struct.pack("<Q", len(document_indices)),
            np.asarray(sequence_lengths, dtype=np.int32).tobytes(),
            np.asarray(sequence_pointers, dtype=np.int64).tobytes(),
            np.asarray(document_indices, dtype=np.int64).tobytes(),
        ]
    )


def _concat(chunks: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.zeros(0, dtype)


@dataclass
class IndexInfo:
    """The parsed .idx of a dataset."""

    dtype: np.dtype
    sequence_lengths: np.ndarray
    sequence_pointers: np.ndarray
    document_indices: np.ndarray

    def document_lengths(self) -> np.ndarray:
        csum = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return csum[self.document_indices[1:]] - csum[self.document_indices[:-1]]


def _parse_index(path: str, data: Any) -> IndexInfo:
    """Parse .idx bytes (or a read-only mmap of them); every inconsistency is a DatasetError
    naming `path`."""
    header = len(INDEX_MAGIC) + 8 + 1 + 16
    if data[:len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise DatasetError(f"{path}: not a Megatron index file (bad magic)")
    if len(data) < header:
        raise DatasetError(f"{path}: truncated index ({len(data)} bytes, header needs {header})")
    offset = len(INDEX_MAGIC)
    (version,) = struct.unpack_from("<Q", data, offset)
    (code,) = struct.unpack_from("<B", data, offset + 8)
    seq_count, doc_count = struct.unpack_from("<QQ", data, offset + 9)
    if version != INDEX_VERSION or code not in _CODE_DTYPES:
        raise DatasetError(f"{path}: unsupported version {version} or dtype code {code}")
    expected = header + 12 * seq_count + 8 * doc_count
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes in"
        raise DatasetError(f"{path}: {what} index ({len(data)} bytes; {seq_count} sequences and "
                           f"{doc_count} document entries need {expected})")
    offset = header
    lengths = np.frombuffer(data, np.int32, seq_count, offset)
    offset += 4 * seq_count
    pointers = np.frombuffer(data, np.int64, seq_count, offset)
    offset += 8 * seq_count
    doc_idx = np.frombuffer(data, np.int64, doc_count, offset)
    if doc_count < 1 or doc_idx[0] != 0 or doc_idx[-1] != seq_count or (
            doc_count > 1 and (np.diff(doc_idx) < 0).any()):
        raise DatasetError(f"{path}: inconsistent document index (must rise from 0 to the "
                           f"{seq_count} sequences)")
    if seq_count and lengths.min() < 0:
        raise DatasetError(f"{path}: negative sequence length")
    return IndexInfo(_CODE_DTYPES[code], lengths, pointers, doc_idx)


def read_index(prefix: str) -> IndexInfo:
    """Parse `{prefix}.idx` (no torch, no megatron import).

    The file is memory-mapped, not read: the arrays are views of the page cache, shared by
    every process of a node that checks the same dataset (the trainer checks its --data-path
    on every rank at start-up; a 300M-document domain has a ~6 GB index).

    Raises:
        DatasetError: the file is missing, truncated or inconsistent (message names it).
    """
    path = idx_path(prefix)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as err:
        raise DatasetError(
            f"{path}: cannot read the dataset index ({err.strerror or err})") from err
    return _parse_index(path, data)


def check_dataset(prefix: str) -> IndexInfo:
    """Read `{prefix}.idx` strictly and check `{prefix}.bin` holds exactly its tokens.

    The one dataset check for every consumer (planner, audit, merge, the trainer's
    `--data-path`): a missing, truncated or mismatched pair becomes one `DatasetError` line
    naming the file, instead of a traceback (or silently wrong samples) later.

    Raises:
        DatasetError: naming the .idx or .bin and what is wrong.
    """
    index = read_index(prefix)
    path = bin_path(prefix)
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the dataset tokens ({err.strerror or err}); "
                           f"its index is {idx_path(prefix)}") from err
    itemsize = np.dtype(index.dtype).itemsize
    expected = int(index.sequence_lengths.sum(dtype=np.int64)) * itemsize
    if index.sequence_pointers.size:
        end = index.sequence_pointers.astype(np.int64) + index.sequence_lengths * itemsize
        expected = max(expected, int(end.max()))
    if size < expected:
        raise DatasetError(f"{path}: truncated ({size} bytes; {idx_path(prefix)} needs "
                           f"{expected})")
    if size > expected and not os.path.islink(path):  # views link to a larger source .bin
        raise DatasetError(f"{path}: {size} bytes but {idx_path(prefix)} describes {expected}: "
                           "the pair comes from different runs")
    return index


def read_document(prefix: str, index: IndexInfo, doc: int) -> np.ndarray:
    """Tokens of document `doc` (all its sequences), read from `{prefix}.bin`."""
    first, last = index.document_indices[doc], index.document_indices[doc + 1]
    if first == last:
        return np.zeros(0, dtype=index.dtype)
    start = int(index.sequence_pointers[first])
    count = int(index.sequence_lengths[first:last].sum())
    return np.fromfile(bin_path(prefix), dtype=index.dtype, count=count, offset=start)
