"""Optional C++ helpers (`megatron_longctx._csrc`, built from csrc/) with numpy twins.

`BACKEND` says which one is active: "csrc" when the extension imported, else "numpy". Setting
MEGATRON_LONGCTX_NO_CSRC=1 forces the numpy path (tests compare both). The functions here take and
return numpy arrays only, so callers never see which backend ran.
"""

from __future__ import annotations

import os

import numpy as np

_csrc = None
if os.environ.get("MEGATRON_LONGCTX_NO_CSRC", "0") != "1":
    try:
        from megatron_longctx import _csrc  # type: ignore[attr-defined,no-redef]
    except ImportError:
        _csrc = None

BACKEND = "csrc" if _csrc is not None else "numpy"


def length_histogram_numpy(lengths: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy twin of `length_histogram`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    edges = np.asarray(edges, dtype=np.int64)
    if edges.size < 2:
        raise ValueError("need at least two bin edges")
    if lengths.size and (lengths.min() < edges[0] or lengths.max() >= edges[-1]):
        raise ValueError("length outside the histogram edges")
    bins = np.searchsorted(edges, lengths, side="right") - 1
    counts = np.bincount(bins, minlength=edges.size - 1).astype(np.int64)
    tokens = np.bincount(bins, weights=lengths, minlength=edges.size - 1)
    # float64 sums are exact below 2**53 tokens per bin (SlimPajama is ~2**39 in total).
    return counts, tokens.astype(np.int64)


def length_histogram(lengths: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Documents and token sums per length bin `[edges[i], edges[i+1])`.

    Args:
        lengths: document lengths in tokens (any integer dtype).
        edges: increasing bin edges; every length must satisfy edges[0] <= l < edges[-1].

    Returns:
        (counts, token_sums), both int64 of size len(edges) - 1.
    """
    if _csrc is None:
        return length_histogram_numpy(lengths, edges)
    try:
        counts, tokens = _csrc.length_histogram(
            np.ascontiguousarray(lengths, dtype=np.int64), np.ascontiguousarray(edges, np.int64)
        )
    except (IndexError, ValueError) as err:  # pybind11 maps out_of_range / invalid_argument
        raise ValueError(str(err)) from err
    return counts, tokens
