"""Merge the shards of a sharded preprocessing run into one dataset per (domain, json key).

Shards are contiguous slices of the sorted input list, so appending shard i's documents in shard
order reproduces a single run's bytes exactly; stats are recomputed from the merged lengths (so
medians and histograms are exact, not merged estimates) and the run metadata (inputs, records,
skip counts and samples) is concatenated in shard order, which is what a single run records.
The merged marker is written last, like a shard's.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

import numpy as np

from megatron_longctx.atomic import write_json_atomic
from megatron_longctx.data.indexed import IndexedDatasetWriter, read_index
from megatron_longctx.data.preprocess import MARKER_SUFFIX, dataset_prefix
from megatron_longctx.data.stats import document_stats, load_stats

_SHARD_RE = re.compile(r"\.shard(\d{5})-of(\d{5})" + re.escape(MARKER_SUFFIX) + "$")
# Config fields that may differ between shards of one run.
_PER_SHARD_FIELDS = {"shard_index", "workers", "log_interval", "batch_bytes"}


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


def merge_shards(input_prefix: str, output_prefix: str) -> dict[str, dict[str, Any]]:
    """Merge all shards of `input_prefix` into `output_prefix`; returns the merged datasets."""
    markers = []
    for path in find_shard_markers(input_prefix):
        with open(path) as fh:
            markers.append(json.load(fh))
    base = {k: v for k, v in markers[0]["config"].items() if k not in _PER_SHARD_FIELDS}
    for marker in markers[1:]:
        other = {k: v for k, v in marker["config"].items() if k not in _PER_SHARD_FIELDS}
        if other != base:
            diff = sorted(k for k in base if base[k] != other.get(k))
            raise MergeError(f"--input-prefix {input_prefix!r}: shards differ in {diff}")
    level = base["level"]
    max_samples = base["max_error_samples"]

    # (domain, key) -> [(shard dataset prefix, stats)] in shard order
    parts: dict[tuple[str | None, str], list[tuple[str, dict]]] = {}
    all_inputs: list[dict] = []
    skipped: dict[str, int] = {}
    samples: dict[str, list] = {}
    for marker in markers:
        shard_stats = None  # every stats file of a shard carries the same run-level metadata
        for prefix, info in marker["datasets"].items():
            shard_stats = load_stats(prefix + ".stats.json")
            parts.setdefault((info["domain"], info["json_key"]), []).append((prefix, shard_stats))
        all_inputs += [{"path": f, "bytes": os.path.getsize(f)} for f in marker["files"]]
        for reason, count in marker["summary"]["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
        for reason, items in (shard_stats or {}).get("skipped_samples", {}).items():
            room = max_samples - len(samples.setdefault(reason, []))
            samples[reason].extend(items[: max(room, 0)])
    records_read = sum(m["summary"]["records_read"] for m in markers)
    merged: dict[str, dict[str, Any]] = {}

    for (domain, key), shard_parts in sorted(parts.items(), key=lambda kv: str(kv[0])):
        out = dataset_prefix(output_prefix, domain, key, level)
        dtype = read_index(shard_parts[0][0]).dtype
        writer = IndexedDatasetWriter(out, dtype)
        try:
            for prefix, _ in shard_parts:
                writer.add_index(prefix)
            template = shard_parts[0][1]
            stats = {
                **{k: template[k] for k in ("format",)},
                "dataset": os.path.basename(out),
                "domain": domain,
                "json_key": key,
                "level": level,
                "dtype": np.dtype(dtype).name,
                "sequences": int(writer.sequence_lengths().size),
                **document_stats(writer.document_lengths()),
                "tokenizer": template["tokenizer"],
                "preprocess": template["preprocess"],
                "inputs": all_inputs,
                "records_read": records_read,
                "skipped": dict(sorted(skipped.items())),
                "skipped_samples": {k: v for k, v in sorted(samples.items()) if v},
            }
            write_json_atomic(out + ".stats.json", stats)
            writer.finalize()
        except BaseException:
            writer.abort()
            raise
        merged[out] = {
            "domain": domain,
            "json_key": key,
            "documents": stats["documents"],
            "tokens": stats["tokens"],
        }
    write_json_atomic(
        output_prefix + ".merged" + MARKER_SUFFIX,
        {"shards": [m["config"]["shard_index"] for m in markers], "datasets": merged},
    )
    return merged
