"""Dataset views: an .idx that lists some documents (or pieces of them) of an existing dataset.

A view realizes one length bucket of a plan for stock Megatron-LM: `{view}.idx` lists only the
bucket's documents with their original sequence pointers, and `{view}.bin` is a relative symlink
to the source `.bin`. megatron.core's IndexedDataset trusts the pointers, so a plain blend file
over views (`--data-args-path`) realizes the plan with no code of ours. A view costs 12 bytes per
sequence (int32 length + int64 pointer) and no token copy: SlimPajama's ~590M documents need
~7 GB of views instead of ~1.2 TB of copied tokens.

`cut` views list each document as pieces of at most `cut_length` tokens, each piece its own
document, so Megatron's shuffling separates them ("Cut at 4K").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from megatron_longctx.data.indexed import IndexInfo, bin_path, idx_path, index_bytes, read_index

VIEWS_NOTE = "views pack each bucket separately; shares exact up to one sample per view"


@dataclass(frozen=True)
class PlannedView:
    """One view a plan realizes: which source documents, under which prefix, with what weight."""

    domain: str
    #: "short", "long", "cut" (train) or "valid" (held out).
    bucket: str
    #: `{view}.idx/.bin` prefix.
    view: str
    #: Source document ids, in order.
    document_ids: np.ndarray
    #: Tokens in those documents.
    tokens: int
    #: Train views: the plan's target tokens; valid views: the domain's target share.
    weight: float

    @property
    def documents(self) -> int:
        return int(self.document_ids.size)


@dataclass(frozen=True)
class Realization:
    """What `write_views_and_blends` wrote (returned, and shown in the report; not in the plan)."""

    blend_file: str
    per_split_file: str
    views: list[PlannedView]
    note: str = VIEWS_NOTE


def _sequence_ranges(index: IndexInfo, doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sequence ids of the documents, in order; sequences per document)."""
    starts = index.document_indices[doc_ids]
    counts = index.document_indices[doc_ids + 1] - starts
    total = int(counts.sum())
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + offsets, counts


def view_arrays(
    index: IndexInfo, doc_ids: np.ndarray, cut_length: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sequence_lengths, sequence_pointers, document_indices) of a view."""
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    if cut_length is None:
        seq_ids, counts = _sequence_ranges(index, doc_ids)
        doc_index = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return index.sequence_lengths[seq_ids], index.sequence_pointers[seq_ids], doc_index
    # Pieces over each document's contiguous token range (its sequences are back to back).
    lengths = index.document_lengths()[doc_ids]
    first_seq = index.document_indices[doc_ids]
    start_ptr = index.sequence_pointers[np.minimum(first_seq, len(index.sequence_pointers) - 1)]
    pieces = -(-lengths // cut_length)  # ceil
    total = int(pieces.sum())
    k = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    doc_len = np.repeat(lengths, pieces)
    piece_len = np.minimum(cut_length, doc_len - k * cut_length)
    itemsize = np.dtype(index.dtype).itemsize
    pointers = np.repeat(start_ptr, pieces) + k * cut_length * itemsize
    return piece_len, pointers, np.arange(total + 1, dtype=np.int64)


def write_view(src_prefix: str, view_prefix: str, doc_ids: np.ndarray,
               cut_length: int | None = None, index: IndexInfo | None = None) -> int:
    """Write `{view_prefix}.idx` (atomically) and link `{view_prefix}.bin` to the source .bin.

    Returns the number of documents in the view.
    """
    index = read_index(src_prefix) if index is None else index
    lengths, pointers, doc_index = view_arrays(index, doc_ids, cut_length)
    os.makedirs(os.path.dirname(os.path.abspath(view_prefix)), exist_ok=True)
    link = bin_path(view_prefix)
    target = os.path.relpath(os.path.abspath(bin_path(src_prefix)),
                             os.path.dirname(os.path.abspath(link)))
    if os.path.islink(link) or os.path.exists(link):
        os.unlink(link)
    os.symlink(target, link)
    tmp = idx_path(view_prefix) + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(index_bytes(index.dtype, lengths, pointers, doc_index))
    os.replace(tmp, idx_path(view_prefix))
    return len(doc_index) - 1
