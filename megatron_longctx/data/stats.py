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

Provenance (written by preprocessing and merge, checked by `load_checked_stats`): `index`
holds the sha256 and sizes of the .idx/.bin the stats describe (written after the pair is
published) and `inputs` each input file's size, mtime and sha256; the run's completion marker
lists each dataset with the same .idx sha256. The planner refuses stats whose counts or index
hash differ from the dataset beside them, and stats whose run's marker is missing or does not
list them with that .idx (`check_run_marker`). A single run and a merge of its shards write
equal stats files (same data, inputs and .idx).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

import numpy as np

from megatron_longctx.data.indexed import DatasetError, check_dataset, file_sha256
from megatron_longctx.data.native import length_histogram
from megatron_longctx.data.records import safe_domain_name

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
    """Read a stats file; raises DatasetError naming it when missing, not JSON or not stats."""
    try:
        with open(path, encoding="utf-8") as fh:
            stats = json.load(fh)
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the stats file ({err.strerror or err})") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not a JSON stats file ({err}); rerun "
                           "tools/preprocess_data.py") from err
    if not isinstance(stats, dict) or stats.get("format") != STATS_FORMAT:
        raise DatasetError(f"{path}: not a {STATS_FORMAT} stats file")
    for key in ("documents", "tokens"):
        value = stats.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DatasetError(f"{path}: {key}: must be a non-negative integer, got {value!r}")
    if not isinstance(stats.get("histogram"), dict) or not isinstance(
            stats["histogram"].get("bins"), list):
        raise DatasetError(f"{path}: histogram.bins: missing")
    if not isinstance(stats.get("tokenizer"), dict):
        raise DatasetError(f"{path}: tokenizer: missing")
    return stats


def run_markers(path: str, stats: dict[str, Any]) -> list[str]:
    """The completion markers that may list the dataset of stats file `path`: the dataset is
    `{run}_{domain}_{key}_{level}` (preprocess_data.py's naming), its run's marker
    `{run}.done.json` (a preprocessing shard or run) or `{run}.merged.done.json` (a merge)."""
    name = os.path.basename(path).removesuffix(".stats.json")
    domain = stats.get("domain")
    suffix = "_".join(["", *([safe_domain_name(domain)] if domain else []),
                       str(stats.get("json_key")), str(stats.get("level"))])
    if not name.endswith(suffix) or len(name) == len(suffix):
        return []
    run = os.path.join(os.path.dirname(path), name[: -len(suffix)])
    return [run + ".done.json", run + ".merged.done.json"]


def check_run_marker(path: str, stats: dict[str, Any]) -> None:
    """A dataset's run must have completed and still list it with the same .idx.

    Checked for stats that record their `index` (written by preprocess_data.py and
    merge_datasets.py): a completion marker beside them (`run_markers`) must
    list the dataset with the same .idx sha256. Otherwise the dataset is left over from an
    interrupted run, or from an earlier run into the same prefix (a domain the new input no
    longer has). Moving a run's directory keeps it valid; moving datasets without their
    marker does not.

    Raises:
        DatasetError: naming the stats file and the marker.
    """
    recorded = (stats.get("index") or {}).get("idx_sha256")
    markers = run_markers(path, stats)
    if not recorded or not markers:
        return
    name = os.path.basename(path).removesuffix(".stats.json")
    found = [m for m in markers if os.path.exists(m)]
    for marker in found:
        try:
            with open(marker, encoding="utf-8") as fh:
                datasets = json.load(fh).get("datasets", {})
        except (OSError, ValueError, AttributeError):
            raise DatasetError(f"{marker}: unreadable completion marker (needed by {path}); "
                               "rerun the run that wrote it") from None
        for prefix, entry in datasets.items():
            if os.path.basename(prefix) == name and entry.get("idx_sha256") == recorded:
                return
    if not found:
        raise DatasetError(f"{path}: the run that wrote it did not complete (no {markers[0]}); "
                           "rerun tools/preprocess_data.py (or tools/merge_datasets.py)")
    raise DatasetError(f"{path}: left over from an earlier run: the completed run's marker "
                       f"{found[0]} does not list this dataset with this .idx; delete the "
                       "dataset or rerun")


def check_stats_against_index(path: str, stats: dict[str, Any], prefix: str) -> None:
    """The stats must describe `{prefix}.idx/.bin` as they are: documents, tokens, and the
    index's sha256 when recorded; raises DatasetError naming both files."""
    index = check_dataset(prefix)
    documents = len(index.document_indices) - 1
    tokens = int(index.sequence_lengths.sum(dtype=np.int64))
    if (stats["documents"], stats["tokens"]) != (documents, tokens):
        raise DatasetError(
            f"{path} describes {stats['documents']:,} documents / {stats['tokens']:,} tokens "
            f"but {prefix}.idx has {documents:,} / {tokens:,}: stats and data come from "
            "different runs; rerun tools/preprocess_data.py"
        )
    recorded = (stats.get("index") or {}).get("idx_sha256")
    if recorded and recorded != file_sha256(prefix + ".idx"):
        raise DatasetError(f"{path} was written for another {prefix}.idx (sha256 differs): "
                           "stats and data come from different runs; rerun "
                           "tools/preprocess_data.py")


def load_checked_stats(prefix: str) -> dict[str, Any]:
    """`{prefix}.stats.json`, checked against its dataset and its run (planner, audit, merge).

    Raises:
        DatasetError: a missing/corrupt stats file or dataset, stats that do not describe the
            dataset, or a dataset left over from an interrupted or earlier run.
    """
    path = prefix + ".stats.json"
    stats = load_stats(path)
    check_stats_against_index(path, stats, prefix)
    check_run_marker(path, stats)
    return stats
