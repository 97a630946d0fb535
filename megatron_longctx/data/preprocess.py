"""Stage 1 executor: jsonl(.gz/.zst) records -> per-domain Megatron indexed datasets + stats.

Data flow (one shard of the sorted input file list):

    files --iter_blocks (decompress, cut at line ends)--> ~1 MiB blocks of lines
      --worker pool: parse_record (JSON, validation, domain), split sentences,
        tokenizer.encode_batch per domain, EOD--> numpy arrays per domain + bad records
      --IndexedDatasetWriter per (domain, json key)--> .bin/.idx (+ .stats.json) --> marker

Why this shape: tokenization is ~90% of the cost and JSON parsing most of the rest, so both run in
`--workers` processes on whole blocks (one backend call per domain per block instead of one
Python call per document, as in Megatron-LM's Pool.imap over lines). The main process only
decompresses, finds line ends and writes arrays (~0.1 s of CPU per 16 MB here), so one reader
keeps many workers busy. At most `2 * workers + 2` blocks are in flight, so memory stays bounded
for any input size (a Pool.imap over a file enqueues the whole file). Results are consumed in
submission order, so every dataset's bytes are independent of `--workers` and of the block
size, and equal Megatron-LM's for the same input, tokenizer and flags.

Sharding: `--num-shards K --shard-index i` takes the i-th contiguous slice of the sorted file
list (so concatenating shard outputs in order equals one run), writes outputs under
`{prefix}.shard{i:05d}-of{K:05d}` and a completion marker `{that}.done.json` last; a rerun whose
marker matches the same configuration and the same input contents skips the shard.

Publication order and provenance: a rerun first removes the stats files of the
datasets the previous marker listed, then the marker; each dataset is published as: old stats
removed, `.bin/.idx` renamed (indexed.py), new stats written (with the published .idx's
sha256); the marker comes last and lists each dataset with that sha256. A kill at any point
leaves no stats file that describes other data than the pair beside it, and the planner
refuses stats whose run's marker does not list them with that .idx
(`stats.load_checked_stats`). Inputs are identified by content: the fingerprint hashes every
input (sha256, ~1 GB/s: a few % of tokenizing the same bytes), so an input edited in place,
even keeping its size and mtime, is rebuilt.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from megatron_longctx.atomic import write_json_atomic
from megatron_longctx.config.preprocess import PreprocessConfig
from megatron_longctx.data import records as rec
from megatron_longctx.data.indexed import (
    DatasetError,
    IndexedDatasetWriter,
    file_sha256,
    optimal_dtype,
)
from megatron_longctx.data.sentences import SentenceSplitter, SplitterSpec, resolve_splitter
from megatron_longctx.data.stats import STATS_FORMAT, document_stats, load_checked_stats
from megatron_longctx.data.tokenizers import TextTokenizer, build_tokenizer

MARKER_SUFFIX = ".done.json"


class PreprocessError(Exception):
    """A bad record under `--on-error fail`, or an unusable input; the message has file:line."""


# ----------------------------------------------------------------------------------------------
# Naming
# ----------------------------------------------------------------------------------------------


def shard_prefix(output_prefix: str, shard_index: int, num_shards: int) -> str:
    """The prefix one shard writes under (the output prefix itself when unsharded)."""
    if num_shards == 1:
        return output_prefix
    return f"{output_prefix}.shard{shard_index:05d}-of{num_shards:05d}"


def dataset_prefix(prefix: str, domain: str | None, key: str, level: str) -> str:
    """`{prefix}_{key}_{level}` as Megatron-LM names it, with `_{domain}` before the key."""
    if domain is None:
        return f"{prefix}_{key}_{level}"
    return f"{prefix}_{rec.safe_domain_name(domain)}_{key}_{level}"


def shard_files(files: list[str], shard_index: int, num_shards: int) -> list[str]:
    """Contiguous slice i of K: files[i*n//K : (i+1)*n//K]."""
    n = len(files)
    return files[shard_index * n // num_shards : (shard_index + 1) * n // num_shards]


# ----------------------------------------------------------------------------------------------
# Worker side: text batch -> token arrays
# ----------------------------------------------------------------------------------------------


@dataclass
class EncodedBatch:
    """Tokens of one batch of records for every json key; only records kept in all keys."""

    keep: np.ndarray  # bool per input record
    tokens: list[np.ndarray]  # per key
    sequence_lengths: list[np.ndarray]  # per key
    sequences_per_document: list[np.ndarray]  # per key


class BatchEncoder:
    """Splits (optionally) and tokenizes record texts of one domain."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        splitter: SentenceSplitter | None,
        append_eod: bool,
        dtype: np.dtype,
    ) -> None:
        self.tokenizer = tokenizer
        self.splitter = splitter
        self.append_eod = append_eod
        self.dtype = dtype

    def _pieces(self, text: str | list[str]) -> list[str]:
        if isinstance(text, list):  # already split, as Megatron's split step writes
            return text
        if self.splitter is not None:
            return self.splitter.split(text)
        return [text]

    def encode(self, texts_per_record: list[tuple[str | list[str], ...]]) -> EncodedBatch:
        num_records = len(texts_per_record)
        num_keys = len(texts_per_record[0]) if num_records else 0
        per_key = []
        keep = np.ones(num_records, dtype=bool)
        for k in range(num_keys):
            if self.splitter is None and all(isinstance(t[k], str) for t in texts_per_record):
                pieces: list[str] = [t[k] for t in texts_per_record]
                owner_arr = np.arange(num_records, dtype=np.int64)
            else:
                pieces = []
                owner: list[int] = []
                for r, texts in enumerate(texts_per_record):
                    split = self._pieces(texts[k])
                    pieces.extend(split)
                    owner.extend([r] * len(split))
                owner_arr = np.asarray(owner, dtype=np.int64)
            flat, lengths = self.tokenizer.encode_batch(pieces)
            nonempty = lengths > 0  # Megatron drops sentences with no tokens
            seq_lengths = lengths[nonempty]
            seq_owner = owner_arr[nonempty]
            seqs_per_doc = np.bincount(seq_owner, minlength=num_records)
            keep &= seqs_per_doc > 0
            per_key.append((flat, seq_lengths, seq_owner, seqs_per_doc))

        batch = EncodedBatch(keep, [], [], [])
        for flat, seq_lengths, seq_owner, seqs_per_doc in per_key:
            if not keep.all():  # drop records that are empty in any key, from every key
                seq_keep = keep[seq_owner]
                flat = flat[np.repeat(seq_keep, seq_lengths)]
                seq_lengths = seq_lengths[seq_keep]
            seqs_per_doc = seqs_per_doc[keep]
            if self.append_eod and seqs_per_doc.size:
                seq_ends = np.cumsum(seqs_per_doc)  # one past each document's last sequence
                token_ends = np.cumsum(seq_lengths)[seq_ends - 1]
                flat = np.insert(flat, token_ends, self.tokenizer.eod)
                seq_lengths = seq_lengths.copy()
                seq_lengths[seq_ends - 1] += 1
            batch.tokens.append(flat.astype(self.dtype))
            batch.sequence_lengths.append(seq_lengths.astype(np.int32))
            batch.sequences_per_document.append(seqs_per_doc.astype(np.int32))
        return batch


@dataclass
class BlockResult:
    """What a worker returns for one block of input lines."""

    records_read: int
    text_bytes: int
    bad: list[rec.BadRecord]  # in line order
    parts: list[tuple[str | None, EncodedBatch]]  # per domain, in first-appearance order


@dataclass
class BlockProcessor:
    """Parses, validates, routes and tokenizes one block of lines (runs in each worker)."""

    encoder: BatchEncoder
    json_keys: list[str]
    domain_key: str | None

    def process(self, path: str, first_line: int, block: bytes) -> BlockResult:
        groups: dict[str | None, list[tuple[str | list[str], ...]]] = {}
        group_lines: dict[str | None, list[int]] = {}
        bad: list[rec.BadRecord] = []
        records_read = text_bytes = 0
        for line_no, raw in rec.split_block(first_line, block):
            parsed = rec.parse_record(path, line_no, raw, self.json_keys, self.domain_key)
            if parsed is None:
                continue
            records_read += 1
            if isinstance(parsed, rec.BadRecord):
                bad.append(parsed)
                continue
            groups.setdefault(parsed.domain, []).append(parsed.texts)
            group_lines.setdefault(parsed.domain, []).append(line_no)
            text_bytes += parsed.num_bytes
        parts = []
        for domain, texts in groups.items():
            encoded = self.encoder.encode(texts)
            lines = group_lines[domain]
            bad.extend(
                rec.BadRecord(path, lines[r], "empty_after_tokenization", "no tokens")
                for r in np.nonzero(~encoded.keep)[0]
            )
            parts.append((domain, encoded))
        bad.sort(key=lambda b: b.line)
        return BlockResult(records_read, text_bytes, bad, parts)


_WORKER: BlockProcessor | None = None


def _worker_init(
    tokenizer: TextTokenizer,
    splitter: SplitterSpec | None,
    append_eod: bool,
    dtype: np.dtype,
    json_keys: list[str],
    domain_key: str | None,
) -> None:
    global _WORKER
    # Parallelism comes from the processes; a Rust thread pool per worker would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    splitter_obj = SentenceSplitter(splitter) if splitter is not None else None
    _WORKER = BlockProcessor(
        BatchEncoder(tokenizer, splitter_obj, append_eod, dtype), json_keys, domain_key
    )


def _worker_process(path: str, first_line: int, block: bytes) -> BlockResult:
    assert _WORKER is not None
    return _WORKER.process(path, first_line, block)


# ----------------------------------------------------------------------------------------------
# Main side
# ----------------------------------------------------------------------------------------------


@dataclass
class RunCounters:
    """Counters for the progress line and the summary."""

    records_read: int = 0
    documents_written: int = 0
    tokens_written: int = 0
    text_bytes: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class Progress:
    """tqdm bar on a terminal, plain log lines (at most every 5 s) otherwise; both on stderr."""

    def __init__(self, total_bytes: int | None, log_interval: int, label: str) -> None:
        self.start = time.time()
        self.log_interval = log_interval
        self.label = label
        self._last_log = 0.0
        self._next_docs = log_interval
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_bytes, unit="B", unit_scale=True, desc=label, file=sys.stderr
            )

    def rates(self, c: RunCounters) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        return (
            f"{c.documents_written / elapsed:,.0f} docs/s, {c.tokens_written / elapsed:,.0f} "
            f"tokens/s, {c.text_bytes / elapsed / 1e6:.2f} MB/s"
        )

    def update(self, c: RunCounters, bytes_done: int) -> None:
        """`bytes_done`: decompressed input bytes handed to the writer so far."""
        if c.documents_written < self._next_docs:
            return
        self._next_docs = (c.documents_written // self.log_interval + 1) * self.log_interval
        if self._bar is not None:
            self._bar.n = bytes_done
            self._bar.set_postfix_str(self.rates(c), refresh=True)
        elif time.time() - self._last_log >= 5.0:
            self._last_log = time.time()
            print(f"[{self.label}] {c.documents_written:,} docs: {self.rates(c)}", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def input_records(files: list[str]) -> list[dict[str, Any]]:
    """Path, size, mtime and content sha256 of each input file (what a run was made from)."""
    out = []
    for path in files:
        st = os.stat(path)
        out.append({"path": path, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "sha256": file_sha256(path)})
    return out


def config_fingerprint(cfg: PreprocessConfig, inputs: list[dict[str, Any]],
                       tokenizer_sha: str) -> str:
    """Hash of everything that changes a shard's bytes (not workers, logging or batch size):
    the settings, the tokenizer, and each input's path and content (size and sha256; not the
    mtime, so a copy or `touch` does not force a rebuild, while an edit always does)."""
    payload = {
        "files": [(f["path"], f["bytes"], f["sha256"]) for f in inputs],
        "tokenizer": asdict(cfg.tokenizer),
        "tokenizer_sha256": tokenizer_sha,
        "json_keys": cfg.json_keys,
        "domain_key": cfg.domain_key,
        "append_eod": cfg.append_eod,
        "split_sentences": cfg.split_sentences,
        "keep_newlines": cfg.keep_newlines,
        "lang": cfg.lang,
        "punkt_sample_bytes": cfg.punkt_sample_bytes if cfg.split_sentences else None,
        "shard": [cfg.shard_index, cfg.num_shards],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _punkt_sample(files: list[str], cfg: PreprocessConfig) -> str:
    """The first `punkt_sample_bytes` of valid text across all input files (shard-independent)."""
    parts: list[str] = []
    size = 0
    for path in files:
        try:
            for line_no, raw in rec.iter_lines(path):
                record = rec.parse_record(path, line_no, raw, cfg.json_keys, cfg.domain_key)
                if not isinstance(record, rec.Record):
                    continue
                text = record.texts[0]
                text = text if isinstance(text, str) else " ".join(text)
                parts.append(text)
                size += len(text)
                if size >= cfg.punkt_sample_bytes:
                    return "\n\n".join(parts)[: cfg.punkt_sample_bytes]
        except rec.TruncatedInputError:
            continue
    return "\n\n".join(parts)


@dataclass
class ShardResult:
    """What one shard run produced (also the content of its completion marker)."""

    prefix: str
    skipped_as_complete: bool
    datasets: dict[str, dict[str, Any]]
    summary: dict[str, Any]


def _finish_pool(pool: Any, pending: list[Any], timeout: float = 60.0) -> None:
    """Close `pool` gracefully: let the `pending` blocks (at most 2 x workers + 2) finish,
    then close and join it, so the `with` block's `terminate()` finds nothing to kill.

    `Pool.terminate()` SIGTERMs workers that may be idle inside the task queue's read lock or
    mid-write to the result pipe; the pool's handler threads then wait on that pipe, and the
    join in terminate() hung for 492 s once in the test suite (an `--on-error fail` run).
    When a pending block does not finish within `timeout` (a worker died), the pool is left
    to `terminate()`.
    """
    for result in pending:
        if result is not None and not result.ready():
            result.wait(timeout)
            if not result.ready():
                return
    pool.close()
    pool.join()


class _ShardRun:
    """One shard: reads its files, feeds the pool, writes datasets, stats and the marker."""

    def __init__(self, cfg: PreprocessConfig, all_files: list[str], files: list[str]) -> None:
        self.cfg = cfg
        self.all_files = all_files
        self.files = files
        self.prefix = shard_prefix(cfg.output_prefix, cfg.shard_index, cfg.num_shards)
        self.tokenizer = build_tokenizer(cfg.tokenizer)
        if cfg.append_eod and self.tokenizer.eod is None:
            raise ValueError(
                f"--append-eod: tokenizer {cfg.tokenizer.tokenizer_model!r} has no EOS/EOD token"
            )
        self.dtype = optimal_dtype(self.tokenizer.vocab_size)
        self.tokenizer_identity = self.tokenizer.identity()
        self.inputs = input_records(files)
        self.fingerprint = config_fingerprint(cfg, self.inputs, self.tokenizer_identity["sha256"])
        self.counters = RunCounters()
        self.writers: dict[tuple[str | None, str], IndexedDatasetWriter] = {}
        self.splitter: SplitterSpec | None = None

    # -- bad records ---------------------------------------------------------------------------
    def _bad(self, bad: rec.BadRecord) -> None:
        if self.cfg.on_error == "fail":
            raise PreprocessError(
                f"{bad.location()}: {bad.reason}: {bad.detail} (--on-error fail)"
            )
        self.counters.skipped[bad.reason] += 1
        samples = self.counters.samples.setdefault(bad.reason, [])
        if len(samples) < self.cfg.max_error_samples:
            samples.append({"location": bad.location(), "detail": bad.detail})
            print(f"skipped {bad.location()}: {bad.reason}: {bad.detail}", file=sys.stderr)

    # -- writing -------------------------------------------------------------------------------
    def _write(self, result: BlockResult) -> None:
        self.counters.records_read += result.records_read
        self.counters.text_bytes += result.text_bytes
        for bad in result.bad:
            self._bad(bad)
        for domain, encoded in result.parts:
            for k, key in enumerate(self.cfg.json_keys):
                writer = self.writers.get((domain, key))
                if writer is None:
                    name = dataset_prefix(self.prefix, domain, key, self.cfg.level)
                    writer = self.writers[(domain, key)] = IndexedDatasetWriter(name, self.dtype)
                writer.add_documents(
                    encoded.tokens[k],
                    encoded.sequence_lengths[k],
                    encoded.sequences_per_document[k],
                )
            self.counters.tokens_written += int(encoded.tokens[0].size)
            self.counters.documents_written += int(encoded.keep.sum())

    # -- reading -------------------------------------------------------------------------------
    def _tasks(self) -> Iterator[tuple[str, int, bytes] | rec.BadRecord]:
        """Blocks of lines to process, and truncation errors in their place in the input."""
        for path in self.files:
            try:
                for first_line, block in rec.iter_blocks(path, self.cfg.batch_bytes):
                    yield path, first_line, block
            except rec.TruncatedInputError as err:
                yield rec.BadRecord(path, err.line, "truncated_file", err.detail)

    def _encode_all(self, progress: Progress) -> None:
        cfg = self.cfg
        initargs = (self.tokenizer, self.splitter, cfg.append_eod, self.dtype, cfg.json_keys,
                    cfg.domain_key)
        done_bytes = 0

        def consume(task, result) -> None:
            """Write one task's outcome; `result` is an AsyncResult, or None for the inline path."""
            nonlocal done_bytes
            if isinstance(task, rec.BadRecord):
                self._bad(task)
                return
            block_result = _worker_process(*task) if result is None else self._result(task, result)
            self._write(block_result)
            done_bytes += len(task[2])
            progress.update(self.counters, done_bytes)

        if cfg.workers == 1:
            _worker_init(*initargs)
            for task in self._tasks():
                consume(task, None)
            return
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        max_in_flight = 2 * cfg.workers + 2
        with ctx.Pool(cfg.workers, initializer=_worker_init, initargs=initargs) as pool:
            in_flight: collections.deque = collections.deque()
            try:
                for task in self._tasks():
                    async_result = None
                    if not isinstance(task, rec.BadRecord):
                        async_result = pool.apply_async(_worker_process, task)
                    in_flight.append((task, async_result))
                    while len(in_flight) >= max_in_flight:
                        consume(*in_flight.popleft())
                while in_flight:
                    consume(*in_flight.popleft())
            except Exception:
                _finish_pool(pool, [result for _, result in in_flight])
                raise
            _finish_pool(pool, [])

    @staticmethod
    def _result(task: tuple[str, int, bytes], result) -> BlockResult:
        try:
            return result.get()
        except Exception as err:
            path, first_line, block = task
            last_line = first_line + block.count(b"\n")
            raise PreprocessError(
                f"processing {path}:{first_line}..{last_line} failed: "
                f"{type(err).__name__}: {err}"
            ) from err

    # -- the run -------------------------------------------------------------------------------
    def marker_path(self) -> str:
        return self.prefix + MARKER_SUFFIX

    def completed(self) -> dict[str, Any] | None:
        """The marker of a complete earlier run with the same fingerprint, else None.

        Raises:
            PreprocessError: the marker matches but a dataset it lists is damaged (truncated,
                corrupt stats, stats not describing the data): named, with how to rebuild.
        """
        marker = self._read_marker()
        if marker is None or marker.get("fingerprint") != self.fingerprint:
            return None
        local = self._listed(marker)
        if not all(os.path.exists(p + ".idx") and os.path.exists(p + ".bin") for p in local):
            return None
        for prefix in local:
            try:
                load_checked_stats(prefix)
            except DatasetError as err:
                raise PreprocessError(
                    f"{err} (this shard's marker {self.marker_path()} says it is complete; "
                    "delete the marker to rebuild the shard)"
                ) from err
        return marker

    def _read_marker(self) -> dict[str, Any] | None:
        try:
            with open(self.marker_path(), encoding="utf-8") as fh:
                marker = json.load(fh)
        except (OSError, ValueError):
            return None
        if not isinstance(marker, dict) or not isinstance(marker.get("datasets"), dict):
            return None
        return marker

    def _listed(self, marker: dict[str, Any]) -> list[str]:
        """The datasets a marker lists, beside the marker (where this run writes them; a marker
        of a moved directory names the old paths)."""
        here = os.path.dirname(self.marker_path())
        return [os.path.join(here, os.path.basename(p)) for p in marker["datasets"]]

    def _retire_previous_run(self) -> None:
        """Before a rebuild: the stats of every dataset the old marker lists go first (a
        dataset without stats is unusable, not wrong), then the marker."""
        old = self._read_marker()
        for prefix in self._listed(old) if old else []:
            if os.path.exists(prefix + ".stats.json"):
                os.unlink(prefix + ".stats.json")
        if os.path.lexists(self.marker_path()):
            os.unlink(self.marker_path())

    def _check_not_all_skipped(self) -> None:
        """A run that read records but kept none is bad input, not an empty dataset."""
        c = self.counters
        if c.documents_written or not sum(c.skipped.values()):
            return
        for writer in self.writers.values():
            writer.abort()
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(c.skipped.items()))
        where = self.files[0] + (f" and {len(self.files) - 1} more" if len(self.files) > 1 else "")
        raise PreprocessError(
            f"{where}: no documents written: every record was skipped ({reasons}); check "
            "--json-keys/--domain-key and the input format (the 'skipped' lines above name "
            "examples)"
        )

    def _publish(self) -> dict[str, dict[str, Any]]:
        """Publish every dataset: old stats removed, .bin/.idx renamed, then the new stats."""
        datasets: dict[str, dict[str, Any]] = {}
        for (domain, key), writer in sorted(self.writers.items(), key=lambda kv: str(kv[0])):
            stats_path = writer.prefix + ".stats.json"
            if os.path.lexists(stats_path):
                os.unlink(stats_path)
            published = writer.finalize()
            stats = self._stats(domain, key, writer, published)
            write_json_atomic(stats_path, stats)
            datasets[writer.prefix] = {
                "domain": domain,
                "json_key": key,
                "documents": stats["documents"],
                "tokens": stats["tokens"],
                "idx_sha256": published["idx_sha256"],
            }
        return datasets

    def run(self) -> ShardResult:
        cfg = self.cfg
        marker = self.completed()
        if marker is not None:
            print(f"{self.marker_path()}: shard already complete, skipping", file=sys.stderr)
            return ShardResult(self.prefix, True, marker["datasets"], marker["summary"])
        self._retire_previous_run()  # a stale marker must not outlive a partial rerun

        if cfg.split_sentences:
            sample = _punkt_sample(self.all_files, cfg)
            self.splitter = resolve_splitter(
                cfg.lang, cfg.keep_newlines, sample, "input text (first files, sorted)"
            )
            print(f"sentence splitting: {self.splitter.describe}", file=sys.stderr)

        # The bar counts decompressed bytes: its total is known for plain inputs only.
        plain = all(not f.endswith((".gz", ".zst")) for f in self.files)
        total_bytes = sum(os.path.getsize(f) for f in self.files) if plain else None
        progress = Progress(total_bytes, cfg.log_interval, os.path.basename(self.prefix))
        try:
            self._encode_all(progress)
        except BaseException:
            for writer in self.writers.values():
                writer.abort()
            raise
        finally:
            progress.close()
        elapsed = time.time() - progress.start
        self._check_not_all_skipped()

        if cfg.domain_key is None and not self.writers:  # keep Megatron's one (empty) output
            for key in cfg.json_keys:
                name = dataset_prefix(self.prefix, None, key, cfg.level)
                self.writers[(None, key)] = IndexedDatasetWriter(name, self.dtype)

        datasets = self._publish()
        summary = {
            "records_read": self.counters.records_read,
            "documents_written": self.counters.documents_written,
            "tokens_written": self.counters.tokens_written,
            "text_bytes": self.counters.text_bytes,
            "skipped": dict(sorted(self.counters.skipped.items())),
            "seconds": round(elapsed, 3),
            "rates": progress.rates(self.counters),
        }
        write_json_atomic(
            self.marker_path(),
            {
                "fingerprint": self.fingerprint,
                "config": _config_dict(cfg),
                "files": self.files,
                "inputs": self.inputs,
                "datasets": datasets,
                "summary": summary,
            },
        )
        return ShardResult(self.prefix, False, datasets, summary)

    def _stats(self, domain: str | None, key: str, writer: IndexedDatasetWriter,
               published: dict[str, Any]) -> dict:
        cfg = self.cfg
        return {
            "format": STATS_FORMAT,
            "dataset": os.path.basename(writer.prefix),
            "domain": domain,
            "json_key": key,
            "level": cfg.level,
            "dtype": writer.dtype.name,
            "sequences": int(writer.sequence_lengths().size),
            **document_stats(writer.document_lengths()),
            "tokenizer": self.tokenizer_identity,
            "preprocess": {
                "append_eod": cfg.append_eod,
                "split_sentences": cfg.split_sentences,
                "keep_newlines": cfg.keep_newlines,
                "sentence_splitter": self.splitter.describe if self.splitter else None,
                "domain_key": cfg.domain_key,
                "json_keys": cfg.json_keys,
            },
            "inputs": self.inputs,
            "index": published,
            "records_read": self.counters.records_read,
            "skipped": dict(sorted(self.counters.skipped.items())),
            "skipped_samples": {k: v for k, v in sorted(self.counters.samples.items())},
        }


def _config_dict(cfg: PreprocessConfig) -> dict[str, Any]:
    out = asdict(cfg)
    out["level"] = cfg.level
    return out


def run_preprocess(cfg: PreprocessConfig) -> ShardResult:
    """Validate, expand inputs, and run this task's shard. Raises PreprocessError/ValueError."""
    cfg.validate()
    all_files = rec.expand_inputs(cfg.inputs)
    files = shard_files(all_files, cfg.shard_index, cfg.num_shards)
    return _ShardRun(cfg, all_files, files).run()
