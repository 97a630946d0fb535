"""Indexed dataset writer (bytes equal megatron.core's builder), csrc vs numpy, length stats."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_longctx.data import native
from megatron_longctx.data.indexed import IndexedDatasetWriter, optimal_dtype, read_index
from megatron_longctx.data.stats import (
    EXACT_THRESHOLDS,
    document_stats,
    histogram_edges,
    tokens_longer_than,
)


def _random_docs(rng: np.random.Generator, n: int, vocab: int):
    """Documents made of 1-4 sentences each, as (tokens, sentence_lengths) pairs."""
    docs = []
    for _ in range(n):
        lens = rng.integers(1, 50, size=rng.integers(1, 5))
        docs.append((rng.integers(0, vocab, size=int(lens.sum())), lens))
    return docs


@pytest.mark.parametrize("vocab", [1000, 70000])
def test_writer_bytes_equal_megatron_builder(tmp_path, vocab):
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDataset,
        IndexedDatasetBuilder,
    )

    rng = np.random.default_rng(0)
    docs = _random_docs(rng, 300, vocab)
    dtype = optimal_dtype(vocab)
    assert dtype == DType.optimal_dtype(vocab)

    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=DType.optimal_dtype(vocab))
    for tokens, lens in docs:
        ref.add_document(tokens.tolist(), lens.tolist())
    ref.finalize(str(tmp_path / "ref.idx"))

    ours = IndexedDatasetWriter(str(tmp_path / "ours"), dtype)
    # Two uneven chunks: chunking must not change the bytes.
    for chunk in (docs[:123], docs[123:]):
        ours.add_documents(
            np.concatenate([t for t, _ in chunk]),
            np.concatenate([lens for _, lens in chunk]),
            np.array([len(lens) for _, lens in chunk]),
        )
    ours.finalize()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()

    ds = IndexedDataset(str(tmp_path / "ours"))
    assert len(ds) == sum(len(lens) for _, lens in docs)
    np.testing.assert_array_equal(ds[0], docs[0][0][: docs[0][1][0]])
    index = read_index(str(tmp_path / "ours"))
    np.testing.assert_array_equal(
        index.document_lengths(), [len(t) for t, _ in docs]
    )
    np.testing.assert_array_equal(ours.document_lengths(), [len(t) for t, _ in docs])


def test_dtype_rule():
    assert optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert optimal_dtype(None) == np.int32


def test_writer_rejects_ids_out_of_dtype_range(tmp_path):
    writer = IndexedDatasetWriter(str(tmp_path / "x"), np.dtype(np.uint16))
    with pytest.raises(ValueError, match="out of range"):
        writer.add_documents(np.array([70000]), np.array([1]), np.array([1]))
    writer.abort()
    assert not os.listdir(tmp_path)


def test_add_index_concatenates(tmp_path):
    rng = np.random.default_rng(1)
    parts = []
    for name in ("a", "b"):
        w = IndexedDatasetWriter(str(tmp_path / name), np.dtype(np.uint16))
        toks = rng.integers(0, 100, size=30)
        w.add_documents(toks, np.array([10, 5, 15]), np.array([2, 1]))
        w.finalize()
        parts.append(toks)
    merged = IndexedDatasetWriter(str(tmp_path / "m"), np.dtype(np.uint16))
    merged.add_index(str(tmp_path / "a"))
    merged.add_index(str(tmp_path / "b"))
    merged.finalize()
    one = IndexedDatasetWriter(str(tmp_path / "one"), np.dtype(np.uint16))
    one.add_documents(np.concatenate(parts), np.array([10, 5, 15] * 2), np.array([2, 1] * 2))
    one.finalize()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"m{ext}").read_bytes() == (tmp_path / f"one{ext}").read_bytes()


def test_finalize_removes_old_index_before_publishing_new_bin(tmp_path, monkeypatch):
    """A crash between the two renames must not leave new .bin + old .idx (a loadable pair)."""
    prefix = str(tmp_path / "d")
    w = IndexedDatasetWriter(prefix, np.dtype(np.uint16))
    w.add_documents(np.arange(10), np.array([10]), np.array([1]))
    w.finalize()
    w2 = IndexedDatasetWriter(prefix, np.dtype(np.uint16))
    w2.add_documents(np.arange(4), np.array([4]), np.array([1]))

    real_replace = os.replace

    def crash_on_idx(src, dst):
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_idx)
    with pytest.raises(KeyboardInterrupt):
        w2.finalize()
    assert not os.path.exists(prefix + ".idx")  # the new .bin is there, but nothing loads it


def test_csrc_and_numpy_histograms_agree():
    rng = np.random.default_rng(2)
    lengths = rng.lognormal(6, 2, size=50_000).astype(np.int64) + 1
    edges = histogram_edges()
    c_np, t_np = native.length_histogram_numpy(lengths, edges)
    c, t = native.length_histogram(lengths, edges)
    np.testing.assert_array_equal(c, c_np)
    np.testing.assert_array_equal(t, t_np)
    assert c.sum() == lengths.size and t.sum() == lengths.sum()
    with pytest.raises(ValueError, match="outside"):
        native.length_histogram(np.array([edges[-1]]), edges)


def test_csrc_extension_is_built():
    # The Makefile builds it; a silent fallback to numpy would hide a broken csrc build.
    assert native.BACKEND == "csrc"


def test_tokens_longer_than_within_one_percent():
    rng = np.random.default_rng(3)
    # Long-tailed like SlimPajama's Books/ArXiv mix: medians from 300 to 100K tokens.
    lengths = np.concatenate(
        [rng.lognormal(np.log(m), 1.2, size=20_000) for m in (300, 1000, 15_000, 120_000)]
    ).astype(np.int64) + 1
    stats = document_stats(lengths)
    for t in EXACT_THRESHOLDS:
        assert tokens_longer_than(stats, t) == lengths[lengths > t].sum()
    for t in np.unique(np.geomspace(256, 1_000_000, 200).astype(np.int64)):
        exact = lengths[lengths > t].sum()
        estimate = tokens_longer_than(stats, int(t))
        assert abs(estimate - exact) <= 0.01 * exact, (t, estimate, exact)
    assert stats["documents"] == lengths.size and stats["tokens"] == lengths.sum()
    assert stats["length"]["median"] == np.median(lengths)
    assert sum(b[2] for b in stats["histogram"]["bins"]) == lengths.size
    assert sum(b[3] for b in stats["histogram"]["bins"]) == lengths.sum()
