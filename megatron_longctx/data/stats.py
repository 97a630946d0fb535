"""Length statistics of a tokenized dataset: the only input of the mixture planner.

A stats file (`{dataset_prefix}.stats.json`) holds document and token counts, length summaries,
exact token counts above the thresholds the paper uses (1K..1M), and a length histogram for any
other threshold:

- Bins are `[lo, hi)` on integer lengths: width 1 below 256, then geometric with ratio 1.005
  (about 4,400 bins up to 2**40), plus edges at every power of two and power of two + 1 so that
  "longer than 4096" is an exact sum. Only non-empty bins are stored, each with its document
  count and its exact token sum.
- `tokens_longer_than(stats, T)` sums whole bins above T and interpolates inside the one bin that
  holds T. That bin spans at most 0.5% of T, so the estimate is within 0.5% of the true count
  unless a large share of all tokens sits within 0.5% of T (tests check 1% on long-tailed data
  for thresholds from 256 to 1M).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

import numpy as np

from megatron_longctx.data.native import length_histogram

STATS_FORMAT = "megatron_longctx.stats/1"
HISTOGRAM_RULE = "int<256; geometric ratio 1.005; + 2**k and 2**k+1 edges; [lo, hi)"
EXACT_THRESHOLDS = tuple(2**k for k in range(8, 21))  # 256 .. 1M ("longer than", strict)
_MAX_EDGE = 2**40


@lru_cache(maxsize=1)
def histogram_edges() -> np.ndarray:
    """The fixed bin edges (int64, increasing, first 0, last 2**40)."""
    geometric = np.unique(np.round(np.geomspace(256, _MAX_EDGE, 5600)).astype(np.int64))
    powers = np.array([2**k for k in range(8, 41)], dtype=np.int64)
    edges = np.concatenate([np.arange(256), geometric, powers, powers[:-1] + 1])
    return np.unique(edges)


def length_summary(lengths: np.ndarray) -> dict[str, float]:
    if lengths.size == 0:
        return {k: 0 for k in ("min", "p10", "median", "mean", "p90", "p99", "max")}
    p10, p50, p90, p99 = np.percentile(lengths, [10, 50, 90, 99])
    return {
        "min": int(lengths.min()),
        "p10": float(p10),
        "median": float(p50),
        "mean": float(lengths.mean()),
        "p90": float(p90),
        "p99": float(p99),
        "max": int(lengths.max()),
    }


def document_stats(document_lengths: np.ndarray) -> dict[str, Any]:
    """Counts, summary, exact long-token counts and the histogram for document lengths."""
    lengths = np.asarray(document_lengths, dtype=np.int64)
    edges = histogram_edges()
    counts, token_sums = length_histogram(lengths, edges)
    nz = np.nonzero(counts)[0]
    bins = [[int(edges[i]), int(edges[i + 1]), int(counts[i]), int(token_sums[i])] for i in nz]
    return {
        "documents": int(lengths.size),
        "tokens": int(lengths.sum()),
        "length": length_summary(lengths),
        "tokens_longer_than": {str(t): int(lengths[lengths > t].sum()) for t in EXACT_THRESHOLDS},
        "documents_longer_than": {str(t): int((lengths > t).sum()) for t in EXACT_THRESHOLDS},
        "histogram": {"rule": HISTOGRAM_RULE, "bins": bins},
    }


def tokens_longer_than(stats: dict[str, Any], threshold: int) -> float:
    """Tokens in documents longer than `threshold` (exact at stored thresholds, else estimated).

    Inside the bin holding the threshold, documents are assumed spread evenly over the bin's
    integer lengths, so the bin contributes its tokens times the share of lengths above T
    (weighted by length).
    """
    exact = stats.get("tokens_longer_than", {}).get(str(int(threshold)))
    if exact is not None and float(threshold) == int(threshold):
        return float(exact)
    total = 0.0
    for lo, hi, _docs, toks in stats["histogram"]["bins"]:
        if lo > threshold:
            total += toks
        elif hi - 1 > threshold:  # the bin straddles T: lengths lo..hi-1, some above T
            lengths = np.arange(lo, hi, dtype=np.float64)
            total += toks * lengths[lengths > threshold].sum() / lengths.sum()
    return total


def documents_longer_than(stats: dict[str, Any], threshold: int) -> float:
    """Documents longer than `threshold` (exact at stored thresholds, else estimated)."""
    exact = stats.get("documents_longer_than", {}).get(str(int(threshold)))
    if exact is not None:
        return float(exact)
    total = 0.0
    for lo, hi, docs, _toks in stats["histogram"]["bins"]:
        if lo > threshold:
            total += docs
        elif hi - 1 > threshold:
            total += docs * (hi - 1 - threshold) / (hi - lo)
    return total


def domain_of_prefix(prefix: str) -> str:
    """A dataset's domain: its stats file's `domain`, else its name without `_text_document`
    (or `_document`). Used to name per-domain losses and evaluation rows."""
    try:
        with open(prefix + ".stats.json", encoding="utf-8") as handle:
            domain = json.load(handle).get("domain")
        if domain:
            return str(domain)
    except (OSError, ValueError):
        pass
    name = os.path.basename(prefix)
    for suffix in ("_text_document", "_document"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_stats(path: str) -> dict[str, Any]:
    with open(path) as fh:
        stats = json.load(fh)
    if stats.get("format") != STATS_FORMAT:
        raise ValueError(f"{path}: not a {STATS_FORMAT} stats file")
    return stats
