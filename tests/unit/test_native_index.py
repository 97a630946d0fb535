"""Index-building kernels: C++ == numpy bit for bit, pure-Python references, Megatron parity."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
import pytest

from megatron_longctx.data import native

M64 = (1 << 64) - 1
EDGE_FACTORS = np.array([0.0, 0.5, 1.0, 2.3, 7.0])


# ----------------------------------------------------------------------------------------------
# Pure-Python references, written straight from the spec (Python ints, no numpy arithmetic).
# ----------------------------------------------------------------------------------------------


def ref_splitmix(seed: int, counter: int) -> int:
    z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_shuffle(n: int, seed: int) -> list[int]:
    a = list(range(n))
    for i in range(n - 1, 0, -1):
        j = ref_splitmix(seed, i) % (i + 1)
        a[i], a[j] = a[j], a[i]
    return a


def ref_copies(buckets: list[int], repeats: list[float], seed: int) -> list[int]:
    """Copies per document: whole_b, plus one for the extra_b smallest (key, doc id)."""
    n_b = Counter(buckets)
    keys = [ref_splitmix(seed ^ 0x5DEECE66D, d) for d in range(len(buckets))]
    copies = [math.floor(repeats[b]) for b in buckets]
    for b, f in enumerate(repeats):
        whole = math.floor(f)
        extra = math.floor((f - whole) * n_b[b] + 0.5)
        members = sorted((keys[d], d) for d in range(len(buckets)) if buckets[d] == b)
        for _, d in members[:extra]:
            copies[d] += 1
    return copies


def ref_document_index(buckets: list[int], repeats: list[float], seed: int) -> list[int]:
    copies = ref_copies(buckets, repeats, seed)
    unshuffled = [d for d, c in enumerate(copies) for _ in range(c)]
    return [unshuffled[p] for p in ref_shuffle(len(unshuffled), seed)]


def megatron_sample_idx(
    lengths: np.ndarray, doc_index: np.ndarray, seq: int, extra: int, drop_last: bool = True
) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers_cpp
    total = int(lengths[doc_index].sum(dtype=np.int64))
    return helpers_cpp.build_sample_idx_int64(
        lengths.astype(np.int32), doc_index.astype(np.int32), seq, 1, total, drop_last, extra
    )


def read_sample(rows, doc_index, docs, i: int, extra: int) -> np.ndarray:
    """GPTDataset._query_document_sample_shuffle_indices, with docs[d] the tokens of doc d."""
    (first, first_off), (last, last_off) = rows[i], rows[i + 1]
    if first == last:
        return docs[doc_index[first]][first_off : last_off + extra]
    parts = [docs[doc_index[first]][first_off:]]
    parts += [docs[doc_index[k]] for k in range(first + 1, last)]
    parts.append(docs[doc_index[last]][: last_off + extra])
    return np.concatenate(parts)


def random_stream(rng: np.random.Generator, n_docs: int, m: int, max_len: int):
    """Lengths with many 0s and 1s, and a document index with repeats."""
    lengths = rng.integers(0, max_len, n_docs)
    lengths[rng.random(n_docs) < 0.2] = 0
    lengths[rng.random(n_docs) < 0.2] = 1
    return lengths.astype(np.int32), rng.integers(0, n_docs, m).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# splitmix64
# ----------------------------------------------------------------------------------------------


def test_csrc_exports_index_kernels():
    assert native.BACKEND == "csrc"  # the comparisons below would otherwise be numpy vs numpy
    for name in ("splitmix64", "shuffle_index", "build_document_index", "build_sample_index"):
        assert hasattr(native._csrc, name), f"stale extension: rebuild ({name} missing)"


def test_splitmix64_matches_the_sequential_generator():
    # First outputs of the reference splitmix64 seeded with 0 (Vigna's splitmix64.c).
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    for fn in (native.splitmix64, native.splitmix64_numpy):
        out = fn(0, np.arange(3, dtype=np.uint64))
        assert out.dtype == np.uint64 and out.tolist() == expected


@pytest.mark.parametrize("seed", [0, 1, 42, 2**63 + 12345, M64])
def test_splitmix64_csrc_numpy_and_reference_agree(seed):
    rng = np.random.default_rng(seed % 1000)
    edges = np.array([0, 2**64 - 1, 2**64 - 2], dtype=np.uint64)  # 2**64 - 1 + 1 wraps to 0
    counters = np.concatenate([rng.integers(0, 2**63, 200).astype(np.uint64), edges])
    a = native.splitmix64(seed, counters)
    b = native.splitmix64_numpy(seed, counters)
    np.testing.assert_array_equal(a, b)
    assert a.tolist() == [ref_splitmix(seed, int(c)) for c in counters]
    # Larger than the numpy block size, and any shape.
    big = np.arange(200_000, dtype=np.uint64).reshape(400, 500)
    out = native.splitmix64_numpy(seed, big)
    assert out.shape == (400, 500)
    np.testing.assert_array_equal(out, native.splitmix64(seed, big))
    assert native.splitmix64(seed, np.zeros(0, dtype=np.int64)).shape == (0,)


@pytest.mark.parametrize("fn", [native.splitmix64, native.splitmix64_numpy])
def test_splitmix64_rejects_bad_input(fn):
    with pytest.raises(ValueError, match="seed must be in"):
        fn(-1, [0])
    with pytest.raises(ValueError, match="seed must be in"):
        fn(2**64, [0])
    with pytest.raises(ValueError, match="counters must be >= 0"):
        fn(0, [-1])
    with pytest.raises(ValueError, match="integers"):
        fn(0, [0.5])


# ----------------------------------------------------------------------------------------------
# shuffle_index
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 7, 2**64 - 1])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 17, 1000])
def test_shuffle_index_csrc_numpy_reference(n, seed):
    a = native.shuffle_index(n, seed)
    b = native.shuffle_index_numpy(n, seed)
    assert a.dtype == b.dtype == np.int64 and a.shape == (n,)
    np.testing.assert_array_equal(a, b)
    assert a.tolist() == ref_shuffle(n, seed)
    np.testing.assert_array_equal(np.sort(a), np.arange(n))


def test_shuffle_index_large_is_permutation_and_deterministic():
    n = 300_000
    a = native.shuffle_index(n, 5)
    np.testing.assert_array_equal(a, native.shuffle_index_numpy(n, 5))
    np.testing.assert_array_equal(np.bincount(a, minlength=n), np.ones(n))
    np.testing.assert_array_equal(a, native.shuffle_index(n, 5))
    assert (a != native.shuffle_index(n, 6)).mean() > 0.99
    assert (a != np.arange(n)).mean() > 0.99


def test_shuffle_index_is_uniform_over_permutations_of_three():
    # Fisher-Yates gives all 6 orders equally often; j = r % i (Sattolo) would give only the
    # 2 cyclic ones and a skewed j would be caught by the chi-square bound (p ~ 1e-6).
    counts = Counter(tuple(native.shuffle_index(3, s).tolist()) for s in range(6000))
    assert len(counts) == 6
    chi2 = sum((c - 1000) ** 2 / 1000 for c in counts.values())
    assert chi2 < 35


@pytest.mark.parametrize("fn", [native.shuffle_index, native.shuffle_index_numpy])
def test_shuffle_index_rejects_bad_input(fn):
    with pytest.raises(ValueError, match="n must be >= 0"):
        fn(-1, 0)
    with pytest.raises(ValueError, match="seed must be in"):
        fn(3, -5)
    with pytest.raises(ValueError, match="must be an integer"):
        fn(2.5, 0)


# ----------------------------------------------------------------------------------------------
# build_document_index
# ----------------------------------------------------------------------------------------------


# At most 4 copies per document (the C++ fill's 4-wide store path), exactly 5, and more.
FACTOR_SETS = {"edge": EDGE_FACTORS, "max4": [3.5, 0.2, 4.0, 1.7], "max5": [4.5, 0.25]}


@pytest.mark.parametrize("seed", [0, 3, 99, 2**64 - 1])
@pytest.mark.parametrize("n_docs", [0, 1, 2, 9, 700])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("factors", FACTOR_SETS)
def test_document_index_csrc_numpy_reference(n_docs, seed, dtype, factors):
    repeats = np.asarray(FACTOR_SETS[factors], dtype=np.float64)
    rng = np.random.default_rng(seed % 1000 + n_docs)
    buckets = rng.integers(0, repeats.size, n_docs).astype(dtype)
    a = native.build_document_index(buckets, repeats, seed)
    b = native.build_document_index_numpy(buckets, repeats, seed)
    assert a.dtype == b.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert a.tolist() == ref_document_index(buckets.tolist(), repeats.tolist(), seed)


@pytest.mark.parametrize("max_copies", [4, 6])
def test_document_index_multithreaded_path_matches_numpy(max_copies):
    # >= 2**20 documents: the C++ passes run in threads (chunk boundaries inside the output); the
    # result must not change. <= 4 copies per document takes the 4-wide store path.
    rng = np.random.default_rng(11)
    n_docs = (1 << 20) + 12345
    repeats = np.array([0.4, 2.5, 0.3, 3.0, 1.0, 0.0, 0.75, 1.5, 0.999, 3.5, 0.0001, 2.0, 0.6, 1.3])
    if max_copies == 6:
        repeats[9] = 5.5
    buckets = rng.integers(0, repeats.size, n_docs).astype(np.int32)
    a = native.build_document_index(buckets, repeats, 2024)
    np.testing.assert_array_equal(a, native.build_document_index_numpy(buckets, repeats, 2024))
    n_b = np.bincount(buckets, minlength=repeats.size)
    whole = np.floor(repeats)
    expected = whole * n_b + np.floor((repeats - whole) * n_b + 0.5)
    np.testing.assert_array_equal(np.bincount(buckets[a], minlength=repeats.size), expected)


@pytest.mark.parametrize("seed", [41, 111, 312])
def test_document_index_threshold_at_the_window_edges(seed):
    # One bucket of 2000 documents, factor 1.5: for these seeds the 1000th smallest key lies in
    # the last (41) or first (111) key bin that the C++ first pass keeps (bins 2048 +- 64 of
    # 4096), or just past it (312: the fallback pass). The result must not notice.
    buckets = np.zeros(2000, np.int32)
    a = native.build_document_index(buckets, [1.5], seed)
    np.testing.assert_array_equal(a, native.build_document_index_numpy(buckets, [1.5], seed))
    assert a.size == 3000


def test_document_index_counts_and_selection_rule():
    rng = np.random.default_rng(4)
    n_docs, seed = 20_000, 77
    repeats = np.array([0.0, 0.1, 0.5, 1.0, 2.3, 7.0, 0.9999])
    buckets = rng.integers(0, repeats.size, n_docs)
    index = native.build_document_index(buckets, repeats, seed)
    n_b = np.bincount(buckets, minlength=repeats.size)
    copies = np.bincount(index, minlength=n_docs)
    keys = native.splitmix64(seed ^ native.KEY_SALT, np.arange(n_docs))
    assert np.unique(keys).size == n_docs  # distinct keys: the doc-id tie-break never applies
    for b, f in enumerate(repeats):
        whole = math.floor(f)
        extra = math.floor((f - whole) * n_b[b] + 0.5)
        members = np.flatnonzero(buckets == b)
        # Realized copies of the bucket: exactly whole_b * n_b + extra_b.
        assert copies[members].sum() == whole * n_b[b] + extra
        assert set(np.unique(copies[members])) <= {whole, whole + 1}
        # The extra copies go to the documents with the smallest keys.
        chosen = members[copies[members] == whole + 1]
        np.testing.assert_array_equal(
            np.sort(chosen), np.sort(members[np.argsort(keys[members])[:extra]])
        )
    # Shuffle of the id-ordered index with shuffle_index(len, seed).
    unshuffled = np.repeat(np.arange(n_docs), copies)
    np.testing.assert_array_equal(index, unshuffled[native.shuffle_index(index.size, seed)])


def test_document_index_token_weighted_repeat_close_to_factor():
    rng = np.random.default_rng(5)
    n_docs = 200_000
    lengths = np.clip(rng.lognormal(7, 1.5, n_docs), 1, None).astype(np.int64)
    buckets = (lengths > 4096).astype(np.int32)  # <= 4K and > 4K, both large buckets
    repeats = np.array([0.4, 2.5])
    index = native.build_document_index(buckets, repeats, 9)
    realized = np.bincount(buckets[index], weights=lengths[index], minlength=2)
    original = np.bincount(buckets, weights=lengths, minlength=2)
    np.testing.assert_allclose(realized / original, repeats, rtol=0.02)


def test_document_index_deterministic_and_seed_dependent():
    buckets = np.random.default_rng(6).integers(0, 5, 5000)
    a = native.build_document_index(buckets, EDGE_FACTORS, 1)
    np.testing.assert_array_equal(a, native.build_document_index(buckets, EDGE_FACTORS, 1))
    b = native.build_document_index(buckets, EDGE_FACTORS, 2)
    assert a.size == b.size and (a != b).mean() > 0.9
    # A different seed also selects different extra documents (not just another order).
    assert not np.array_equal(np.bincount(a, minlength=5000), np.bincount(b, minlength=5000))


def test_document_index_full_and_empty_buckets():
    # 0.9 x 1 document rounds to one extra copy (the whole bucket); bucket 2 has no documents.
    for fn in (native.build_document_index, native.build_document_index_numpy):
        out = fn(np.array([0, 1, 1, 1]), np.array([0.9, 1.5, 3.0]), 0)
        counts = np.bincount(out, minlength=4)
        assert counts[0] == 1 and counts[1:].sum() == 5  # floor(0.5 * 3 + 0.5) = 2 extras
        assert fn(np.zeros(0, np.int32), np.zeros(0), 0).shape == (0,)


@pytest.mark.parametrize("fn", [native.build_document_index, native.build_document_index_numpy])
def test_document_index_rejects_bad_input(fn):
    buckets = np.array([0, 1, 1])
    for bad in (-0.5, np.nan, np.inf):
        with pytest.raises(ValueError, match="repeat factors must be finite and >= 0"):
            fn(buckets, np.array([1.0, bad]), 0)
    with pytest.raises(ValueError, match=r"bucket ids must be in \[0, 2\): document 2"):
        fn(np.array([0, 1, 2]), np.array([1.0, 1.0]), 0)
    with pytest.raises(ValueError, match="bucket ids must be in"):
        fn(np.array([0, -1]), np.array([1.0, 1.0]), 0)
    with pytest.raises(ValueError, match="bucket ids must be in"):
        fn(np.array([0, 2**40]), np.array([1.0, 1.0]), 0)
    with pytest.raises(ValueError, match="integers"):
        fn(np.array([0.0, 1.0]), np.array([1.0, 1.0]), 0)
    with pytest.raises(ValueError, match="1-D"):
        fn(np.zeros((2, 2), np.int32), np.array([1.0]), 0)
    with pytest.raises(ValueError, match="too large"):
        fn(buckets, np.array([1.0, 2.0**62]), 0)
    with pytest.raises(ValueError, match="seed"):
        fn(buckets, np.array([1.0, 1.0]), -1)


# ----------------------------------------------------------------------------------------------
# build_sample_index
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [0, 1])
@pytest.mark.parametrize("seq", [2, 3, 7, 64, 1000])
@pytest.mark.parametrize("case", ["tiny_docs", "short_docs", "mixed", "long_docs", "divisible"])
def test_sample_index_equals_megatron(case, seq, extra):
    max_len = {"tiny_docs": 3, "short_docs": 8, "mixed": 50, "long_docs": 4000, "divisible": 50}
    rng = np.random.default_rng(seq + 7 * extra + 1000 * len(case))
    # Enough documents for >= 3 samples; seq 64 and 1000 exceed most tiny/short documents.
    m = max(300, 40 * seq // max_len[case] + 50)
    lengths, doc_index = random_stream(rng, n_docs=40, m=m, max_len=max_len[case])
    lengths[doc_index[0]] = 0  # leading empty document (row 0 still says (0, 0))
    lengths[doc_index[-3:]] = 0  # trailing empty documents
    if case == "divisible":  # a final document makes the stream num_samples * seq + extra long
        total = int(lengths[doc_index].sum())
        need = ((total - extra) // seq + 1) * seq + extra
        lengths = np.append(lengths, need - total).astype(np.int32)
        doc_index = np.append(doc_index, lengths.size - 1)
    total = int(lengths[doc_index].sum())
    assert total - extra >= 3 * seq
    if case == "divisible":
        assert (total - extra) % seq == 0
    ref = megatron_sample_idx(lengths, doc_index, seq, extra)
    num_samples = ref.shape[0] - 1
    assert num_samples == (total - extra) // seq
    for fn in (native.build_sample_index, native.build_sample_index_numpy):
        for lens in (lengths, lengths.astype(np.int64)):
            out = fn(doc_index, lens, seq, num_samples, bool(extra))
            assert out.dtype == np.int64 and out.shape == (num_samples + 1, 2)
            np.testing.assert_array_equal(out, ref)
            # Fewer samples: a prefix of the same rows.
            np.testing.assert_array_equal(
                fn(doc_index, lens, seq, num_samples // 2, bool(extra)),
                ref[: num_samples // 2 + 1],
            )


@pytest.mark.parametrize("extra", [0, 1])
def test_sample_index_multiblock_threaded_path_equals_megatron(extra):
    # > 2**21 positions: the C++ gathers in several 2**20-document blocks, split over threads.
    rng = np.random.default_rng(12 + extra)
    lengths, doc_index = random_stream(rng, n_docs=5000, m=(1 << 21) + 777, max_len=20)
    ref = megatron_sample_idx(lengths, doc_index, 37, extra)
    num_samples = ref.shape[0] - 1
    for fn in (native.build_sample_index, native.build_sample_index_numpy):
        np.testing.assert_array_equal(fn(doc_index, lengths, 37, num_samples, bool(extra)), ref)
        few = fn(doc_index, lengths, 37, 1000, bool(extra))  # stops inside the first block
        np.testing.assert_array_equal(few, ref[:1001])
    bad = doc_index.copy()
    bad[(1 << 20) + 5] = -3  # in the second block
    for fn in (native.build_sample_index, native.build_sample_index_numpy):
        with pytest.raises(ValueError, match=rf"document_index\[{(1 << 20) + 5}\] = -3"):
            fn(bad, lengths, 37, num_samples, bool(extra))
        with pytest.raises(ValueError, match=rf"document_index\[{(1 << 20) + 5}\] = -3"):
            fn(bad, lengths, 37, 10, bool(extra))  # beyond the walked part


@pytest.mark.parametrize("extra", [0, 1])
def test_sample_index_reads_back_the_token_stream(extra):
    # Independent of Megatron's code: reading samples the way GPTDataset does gives stream
    # tokens [i * seq, i * seq + seq + extra).
    rng = np.random.default_rng(8)
    lengths, doc_index = random_stream(rng, n_docs=60, m=500, max_len=30)
    offsets = np.concatenate(([0], np.cumsum(lengths.astype(np.int64))))
    docs = [np.arange(offsets[d], offsets[d + 1]) for d in range(lengths.size)]
    stream = np.concatenate([docs[d] for d in doc_index])
    seq = 11
    num_samples = (stream.size - extra) // seq
    rows = native.build_sample_index(doc_index, lengths, seq, num_samples, bool(extra))
    for i in range(num_samples):
        got = read_sample(rows.tolist(), doc_index, docs, i, extra)
        np.testing.assert_array_equal(got, stream[i * seq : i * seq + seq + extra])


@pytest.mark.parametrize("fn", [native.build_sample_index, native.build_sample_index_numpy])
def test_sample_index_errors(fn):
    lengths = np.array([5, 0, 7], dtype=np.int32)
    doc_index = np.array([0, 1, 2])  # 12 tokens
    np.testing.assert_array_equal(fn(doc_index, lengths, 4, 0), [[0, 0]])
    np.testing.assert_array_equal(fn(np.zeros(0, np.int64), lengths, 4, 0), [[0, 0]])
    assert fn(doc_index, lengths, 4, 2).shape == (3, 2)  # 2 * 4 + 1 = 9 <= 12
    with pytest.raises(ValueError, match="needs 13 tokens .* has 12; 2 samples fit"):
        fn(doc_index, lengths, 4, 3)
    assert fn(doc_index, lengths, 4, 3, add_extra_token=False).shape == (4, 2)  # 12 <= 12
    with pytest.raises(ValueError, match="needs 5 tokens .* has 0; 0 samples fit"):
        fn(np.zeros(0, np.int64), lengths, 4, 1)
    with pytest.raises(ValueError, match="2 samples fit"):  # fails before allocating the rows
        fn(doc_index, lengths, 4, 10**15)
    # Error order: bad position, then negative length, then too few tokens.
    with pytest.raises(ValueError, match=r"document_index\[2\]"):
        fn(np.array([0, 1, 5, 0]), np.array([5, -1, 7]), 4, 10**15)
    with pytest.raises(ValueError, match="document 1 has length -1"):
        fn(doc_index, np.array([5, -1, 7]), 4, 10**15)
    with pytest.raises(ValueError, match=r"document_index\[3\]"):  # beyond the walked part
        fn(np.array([0, 1, 2, 9]), lengths, 4, 1)
    with pytest.raises(ValueError, match=r"document_index\[1\] = 3 is outside \[0, 3\)"):
        fn(np.array([0, 3]), lengths, 4, 1)
    with pytest.raises(ValueError, match="document_lengths must be >= 0: document 1"):
        fn(doc_index, np.array([5, -1, 7]), 4, 1)
    with pytest.raises(ValueError, match="seq_length must be >= 1"):
        fn(doc_index, lengths, 0, 1)
    with pytest.raises(ValueError, match="num_samples must be >= 0"):
        fn(doc_index, lengths, 4, -1)
    with pytest.raises(ValueError, match="integers"):
        fn(doc_index.astype(float), lengths, 4, 1)


def test_megatron_partial_sequence_quirks_documented():
    # What we deliberately do not reproduce (drop_last_partial_sequence=False): the padded last
    # sample ends at (last document, its length - extra), which is -1 for an empty last document.
    ref = megatron_sample_idx(np.array([6, 0]), np.array([0, 1]), 2, 1, drop_last=False)
    assert ref.tolist() == [[0, 0], [0, 2], [0, 4], [1, -1]]
    with pytest.raises(ValueError, match="2 samples fit"):
        native.build_sample_index(np.array([0, 1]), np.array([6, 0]), 2, 3)


# ----------------------------------------------------------------------------------------------
# sample_document_boundaries
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [0, 1])
@pytest.mark.parametrize("seq", [1, 4, 13])
def test_sample_document_boundaries_brute_force(seq, extra):
    rng = np.random.default_rng(seq + 10 * extra)
    lengths, doc_index = random_stream(rng, n_docs=30, m=200, max_len=9)
    starts = np.concatenate(([0], np.cumsum(lengths[doc_index].astype(np.int64))))
    first_tokens = set(starts[:-1][lengths[doc_index] > 0].tolist())  # nonempty docs only
    total = int(starts[-1])
    num_samples = (total - extra) // seq
    rows = native.build_sample_index(doc_index, lengths, seq, num_samples, bool(extra))
    seen_boundary = False
    for i in range(num_samples):
        got = native.sample_document_boundaries(rows, doc_index, lengths, i)
        window = range(i * seq + 1, i * seq + seq + extra)
        expected = [p - i * seq for p in window if p in first_tokens]
        assert got.dtype == np.int64 and got.tolist() == expected, i
        seen_boundary = seen_boundary or bool(expected)
    assert seen_boundary or seq + extra == 1  # a 1-token window has no offset > 0


def test_sample_document_boundaries_rejects_bad_sample():
    rows = np.array([[0, 0], [0, 4]])
    with pytest.raises(ValueError, match="sample must be in"):
        native.sample_document_boundaries(rows, np.array([0]), np.array([10]), 1)
    with pytest.raises(ValueError, match="sample must be >= 0"):
        native.sample_document_boundaries(rows, np.array([0]), np.array([10]), -1)
    np.testing.assert_array_equal(
        native.sample_document_boundaries(rows, np.array([0]), np.array([10]), 0), []
    )
    with pytest.raises(ValueError, match="shape"):
        native.sample_document_boundaries(rows.ravel(), np.array([0]), np.array([10]), 0)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def test_wrappers_fall_back_to_numpy_without_the_extension(monkeypatch):
    buckets = np.random.default_rng(9).integers(0, 5, 300)
    with_csrc = native.build_document_index(buckets, EDGE_FACTORS, 4)
    monkeypatch.setattr(native, "_csrc", None)
    np.testing.assert_array_equal(native.build_document_index(buckets, EDGE_FACTORS, 4), with_csrc)
    np.testing.assert_array_equal(native.shuffle_index(50, 1), ref_shuffle(50, 1))
    assert native.splitmix64(0, [0]).tolist() == [0xE220A8397B1DCDAF]
    rows = native.build_sample_index(with_csrc, np.full(300, 5), 16, 10)
    assert rows.shape == (11, 2)
