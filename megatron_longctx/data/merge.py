"""Merge the shards of a sharded preprocessing run into one dataset per (domain, json key).

Shards are contiguous slices of the sorted input list, so appending shard i's documents in shard
order reproduces a single run's bytes exactly; stats are recomputed from the merged lengths (so
medians and histograms are exact, not merged estimates) and the run metadata (inputs, records,
skip counts and samples) is concatenated in shard order, which is what a single run records.
The merged marker is written last, like a shard's.

What is checked: every shard marker must be JSON listing its datasets, every shard
dataset must match its stats (`stats.load_checked_stats`: truncated .bin/.idx, corrupt stats,
stats of another run), each named in a one-line `MergeError`. Merged outputs are published like
a shard's: old stats removed, .bin/.idx renamed, then stats recording the merged .idx's sha256
(equal to a single run's stats), and last the merged marker (`{output_prefix}.merged.done.json`,
with a fingerprint of the shards' fingerprints) listing each dataset with that sha256, which
the planner checks (`stats.check_run_marker`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import Any

import numpy as np

from megatron_longctx.atomic import write_json_atomic
from megatron_longctx.data.indexed import DatasetError, IndexedDatasetWriter, read_index
from megatron_longctx.data.preprocess import MARKER_SUFFIX, dataset_prefix
from megatron_longctx.data.stats import document_stats, load_checked_stats

_SHARD_RE = re.compile(r"\.shard(\d{5})-of(\d{5})" + re.escape(MARKER_SUFFIX) + "$")
# Config fields that may differ between shards of one run.
_PER_SHARD_FIELDS = {"shard_index", "workers", "log_interval", "batch_bytes"}
MERGED_MARKER_SUFFIX = ".merged" + MARKER_SUFFIX


class MergeError(Exception):
    """Shards missing, inconsistent, or outputs absent; the message names what."""


def find_shard_markers(input_prefix: str) -> list[str]:
    """Markers of all K shards of `input_prefix`, in shard order; raises if any is missing."""
    pattern = glob.escape(input_prefix) + ".shard*-of*" + MARKER_SUFFIX
    found: dict[int, str] = {}
    totals = set()
    for path in glob.glob(pattern):
        match = _SHARD_RE.search(path)
        if match:
            found[int(match.group(1))] = path
            totals.add(int(match.group(2)))
    if not found:
        raise MergeError(f"--input-prefix {input_prefix!r}: no completed shards ({pattern})")
    if len(totals) != 1:
        raise MergeError(f"--input-prefix {input_prefix!r}: shards of different counts {totals}")
    total = totals.pop()
    missing = sorted(set(range(total)) - set(found))
    if missing:
        raise MergeError(
            f"--input-prefix {input_prefix!r}: shards {missing} of {total} are not complete "
            "(no marker); rerun them first"
        )
    return [found[i] for i in range(total)]


def read_marker(path: str) -> dict[str, Any]:
    """A shard's completion marker; MergeError naming it when unreadable or incomplete."""
    try:
        with open(path, encoding="utf-8") as fh:
            marker = json.load(fh)
    except (OSError, ValueError) as err:
        raise MergeError(f"{path}: unreadable shard marker ({err}); rerun that shard") from err
    if not isinstance(marker, dict) or not all(
            isinstance(marker.get(k), dict) for k in ("config", "datasets", "summary")):
        raise MergeError(f"{path}: not a shard marker (config/datasets/summary missing); rerun "
                         "that shard")
    return marker


def _check_configs(input_prefix: str, markers: list[dict[str, Any]]) -> dict[str, Any]:
    """The shards' common configuration (fields that may differ per shard removed)."""
    base = {k: v for k, v in markers[0]["config"].items() if k not in _PER_SHARD_FIELDS}
    for marker in markers[1:]:
        other = {k: v for k, v in marker["config"].items() if k not in _PER_SHARD_FIELDS}
        if other != base:
            diff = sorted(k for k in base if base[k] != other.get(k))
            raise MergeError(f"--input-prefix {input_prefix!r}: shards differ in {diff}")
    return base


def _collect(markers: list[tuple[str, dict[str, Any]]], max_samples: int) -> dict[str, Any]:
    """Shard datasets per (domain, key) with their checked stats, and run-level metadata.

    A shard's datasets are looked up beside its marker (where the shard run wrote both), so a
    run directory that was moved or copied merges what it holds, not the original's files.
    """
    parts: dict[tuple[str | None, str], list[tuple[str, dict]]] = {}
    inputs: list[dict] = []
    skipped: dict[str, int] = {}
    samples: dict[str, list] = {}
    for marker_path, marker in markers:
        shard_stats = None  # every stats file of a shard carries the same run-level metadata
        for recorded, info in marker["datasets"].items():
            prefix = os.path.join(os.path.dirname(marker_path), os.path.basename(recorded))
            try:
                shard_stats = load_checked_stats(prefix)
            except DatasetError as err:
                raise MergeError(f"{err} (a shard output; rerun that shard)") from err
            parts.setdefault((info["domain"], info["json_key"]), []).append((prefix, shard_stats))
        inputs += marker.get("inputs") or [{"path": f} for f in marker.get("files", [])]
        for reason, count in marker["summary"]["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
        for reason, items in (shard_stats or {}).get("skipped_samples", {}).items():
            room = max_samples - len(samples.setdefault(reason, []))
            samples[reason].extend(items[: max(room, 0)])
    return {"parts": parts, "inputs": inputs, "skipped": dict(sorted(skipped.items())),
            "samples": {k: v for k, v in sorted(samples.items()) if v},
            "records_read": sum(m["summary"]["records_read"] for _, m in markers)}


def _merge_one(out: str, shard_parts: list[tuple[str, dict]],
               meta: dict[str, Any]) -> dict[str, Any]:
    """Write one merged dataset (published, then its stats); returns the marker entry."""
    domain, key, level = meta["domain"], meta["json_key"], meta["level"]
    dtype = read_index(shard_parts[0][0]).dtype
    writer = IndexedDatasetWriter(out, dtype)
    try:
        for prefix, _ in shard_parts:
            writer.add_index(prefix)
        if os.path.lexists(out + ".stats.json"):
            os.unlink(out + ".stats.json")
        published = writer.finalize()
    except BaseException:
        writer.abort()
        raise
    template = shard_parts[0][1]
    stats = {
        "format": template["format"],
        "dataset": os.path.basename(out),
        "domain": domain,
        "json_key": key,
        "level": level,
        "dtype": np.dtype(dtype).name,
        "sequences": int(writer.sequence_lengths().size),
        **document_stats(writer.document_lengths()),
        "tokenizer": template["tokenizer"],
        "preprocess": template["preprocess"],
        "inputs": meta["inputs"],
        "index": published,
        "records_read": meta["records_read"],
        "skipped": meta["skipped"],
        "skipped_samples": meta["samples"],
    }
    write_json_atomic(out + ".stats.json", stats)
    return {"domain": domain, "json_key": key, "documents": stats["documents"],
            "tokens": stats["tokens"], "idx_sha256": published["idx_sha256"]}


def merge_shards(input_prefix: str, output_prefix: str) -> dict[str, dict[str, Any]]:
    """Merge all shards of `input_prefix` into `output_prefix`; returns the merged datasets."""
    paths = find_shard_markers(input_prefix)
    markers = [read_marker(path) for path in paths]
    base = _check_configs(input_prefix, markers)
    collected = _collect(list(zip(paths, markers)), base["max_error_samples"])
    fingerprint = hashlib.sha256(json.dumps(
        [m.get("fingerprint") for m in markers]).encode()).hexdigest()
    marker_path = output_prefix + MERGED_MARKER_SUFFIX
    if os.path.lexists(marker_path):
        os.unlink(marker_path)
    merged: dict[str, dict[str, Any]] = {}
    for (domain, key), shard_parts in sorted(collected["parts"].items(),
                                             key=lambda kv: str(kv[0])):
        out = dataset_prefix(output_prefix, domain, key, base["level"])
        meta = {**collected, "domain": domain, "json_key": key, "level": base["level"]}
        merged[out] = _merge_one(out, shard_parts, meta)
    write_json_atomic(marker_path, {
        "fingerprint": fingerprint, "shards": [m["config"]["shard_index"] for m in markers],
        "datasets": merged})
    return merged
