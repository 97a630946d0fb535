"""Configuration of stage 1 (jsonl -> per-domain Megatron indexed datasets)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron_longctx.data.tokenizers import TokenizerSpec

ON_ERROR_CHOICES = ("skip", "fail")


@dataclass
class PreprocessConfig:
    """Everything `tools/preprocess_data.py` needs; validated before any work starts."""

    #: Files, globs or directories of .jsonl / .jsonl.gz / .jsonl.zst (`--input`).
    inputs: list[str]
    #: Output path prefix (`--output-prefix`); outputs are `{prefix}[_{domain}]_{key}_{level}`.
    output_prefix: str
    tokenizer: TokenizerSpec
    #: JSON keys to tokenize, one dataset each (`--json-keys`).
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    #: Dotted path of the domain field, e.g. `meta.redpajama_set_name` (`--domain-key`).
    domain_key: str | None = None
    #: Append the tokenizer's EOD id once per document (`--append-eod`).
    append_eod: bool = False
    #: Split documents into sentences with nltk Punkt, one sequence each (`--split-sentences`).
    split_sentences: bool = False
    #: Keep newlines after sentence ends when splitting (`--keep-newlines`).
    keep_newlines: bool = False
    #: Punkt language for installed data (`--lang`).
    lang: str = "english"
    #: Text bytes used to train Punkt when no punkt data is installed (`--punkt-sample-bytes`).
    punkt_sample_bytes: int = 1 << 20
    #: Tokenizer worker processes; 1 tokenizes in the main process (`--workers`).
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: Documents between progress lines (`--log-interval`).
    log_interval: int = 1000
    #: This task's shard of the sorted input file list (`--shard-index`, `--num-shards`).
    shard_index: int = 0
    num_shards: int = 1
    #: `skip` counts bad records and goes on; `fail` stops at the first (`--on-error`).
    on_error: str = "skip"
    #: Text bytes per tokenizer task (`--batch-bytes`). 1 MiB amortises IPC to <1% of the work.
    batch_bytes: int = 1 << 20
    #: Bad-record examples (file:line) kept per reason in the stats (`--max-error-samples`).
    max_error_samples: int = 20

    def validate(self) -> None:
        """Raise ValueError naming the offending flag."""
        if not self.inputs:
            raise ValueError("--input: at least one file, glob or directory is required")
        if not self.output_prefix:
            raise ValueError("--output-prefix is required")
        if not self.json_keys or any(not k for k in self.json_keys):
            raise ValueError("--json-keys needs at least one non-empty key")
        if len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError(f"--json-keys has duplicates: {self.json_keys}")
        if self.domain_key is not None and (
            not self.domain_key or any(not p for p in self.domain_key.split("."))
        ):
            raise ValueError(f"--domain-key {self.domain_key!r} is not a dotted path like a.b")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.log_interval < 1:
            raise ValueError(f"--log-interval must be >= 1, got {self.log_interval}")
        if self.num_shards < 1:
            raise ValueError(f"--num-shards must be >= 1, got {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(
                f"--shard-index must be in [0, --num-shards={self.num_shards}), "
                f"got {self.shard_index}"
            )
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"--on-error must be one of {ON_ERROR_CHOICES}, got {self.on_error}")
        if self.batch_bytes < 1:
            raise ValueError(f"--batch-bytes must be >= 1, got {self.batch_bytes}")
        if self.punkt_sample_bytes < 1:
            raise ValueError(f"--punkt-sample-bytes must be >= 1, got {self.punkt_sample_bytes}")
        if self.keep_newlines and not self.split_sentences:
            raise ValueError("--keep-newlines only applies with --split-sentences")
        self.tokenizer.validate()

    @property
    def level(self) -> str:
        """Megatron's name for what one sequence is: `sentence` when split, else `document`."""
        return "sentence" if self.split_sentences else "document"
