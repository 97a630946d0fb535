"""Configuration of stage 1 (jsonl -> per-domain Megatron indexed datasets).

Every field's flag, default and help are declared here once (config/flags.py);
`config/cli.py` builds `tools/preprocess_data.py`'s parser from them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_longctx.config.flags import Flag, option
from megatron_longctx.config.tokenizer import TokenizerSpec

ON_ERROR_CHOICES = ("skip", "fail")


def slurm_array_defaults(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(shard_index, num_shards) from a SLURM array task's environment, else (0, 1).

    Array ids may start anywhere (`--array=1-16`), so the index is relative to the minimum.
    """
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return 0, 1
    task = int(env["SLURM_ARRAY_TASK_ID"])
    first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    return task - first, int(env["SLURM_ARRAY_TASK_COUNT"])


def _cpu_count() -> int:
    return os.cpu_count() or 1


@dataclass
class PreprocessConfig:
    """Everything `tools/preprocess_data.py` needs; validated before any work starts."""

    inputs: list[str] = option(flag=Flag(
        "--input", "files, globs or directories (.jsonl, .jsonl.gz, .jsonl.zst)",
        required=True, group="input"))
    output_prefix: str = option(flag=Flag(
        "--output-prefix", "output path prefix; outputs are {prefix}[_{domain}]_{key}_{level}",
        required=True, group="output"))
    tokenizer: TokenizerSpec  # flags from TokenizerSpec's fields (--tokenizer-*)
    json_keys: list[str] = option(default_factory=lambda: ["text"], flag=Flag(
        "--json-keys", "JSON keys to tokenize, one dataset each", group="input"))
    domain_key: str | None = option(None, Flag(
        "--domain-key", "dotted path of the domain, e.g. meta.redpajama_set_name (one dataset "
        "per domain)", group="input"))
    append_eod: bool = option(False, Flag(
        "--append-eod", "append the tokenizer's EOD id once per document", group="tokenization"))
    split_sentences: bool = option(False, Flag(
        "--split-sentences", "split documents into sentences with nltk Punkt, one sequence each",
        group="input"))
    keep_newlines: bool = option(False, Flag(
        "--keep-newlines", "keep newlines after sentence ends (with --split-sentences)",
        group="input"))
    lang: str = option("english", Flag(
        "--lang", "Punkt language for installed punkt data", group="input"))
    punkt_sample_bytes: int = option(1 << 20, Flag(
        "--punkt-sample-bytes", "text used to train Punkt when no punkt data is installed",
        group="input"))
    workers: int = option(default_factory=_cpu_count, flag=Flag(
        "--workers", "tokenizer worker processes; 1 tokenizes in the main process",
        group="runtime"))
    log_interval: int = option(1000, Flag(
        "--log-interval", "documents between progress lines", group="runtime"))
    shard_index: int = option(0, Flag(
        "--shard-index", "this task's contiguous slice of the sorted input file list "
        "(CLI default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)", group="runtime",
        cli_default=lambda: slurm_array_defaults()[0]))
    num_shards: int = option(1, Flag(
        "--num-shards", "number of slices (CLI default: SLURM_ARRAY_TASK_COUNT)",
        group="runtime", cli_default=lambda: slurm_array_defaults()[1]))
    on_error: str = option("skip", Flag(
        "--on-error", "skip counts bad records and goes on; fail stops at the first",
        choices=ON_ERROR_CHOICES, group="runtime"))
    batch_bytes: int = option(1 << 20, Flag(
        "--batch-bytes", "text bytes per tokenizer task; 1 MiB amortises IPC to <1%% of the "
        "work", group="runtime"))
    max_error_samples: int = option(20, Flag(
        "--max-error-samples", "bad-record examples (file:line) kept per reason in the stats",
        group="runtime"))

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
        for flag, value in (("--workers", self.workers), ("--log-interval", self.log_interval),
                            ("--num-shards", self.num_shards)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(
                f"--shard-index must be in [0, --num-shards={self.num_shards}), "
                f"got {self.shard_index}"
            )
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"--on-error must be one of {ON_ERROR_CHOICES}, got {self.on_error}")
        for flag, value in (("--batch-bytes", self.batch_bytes),
                            ("--punkt-sample-bytes", self.punkt_sample_bytes)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.keep_newlines and not self.split_sentences:
            raise ValueError("--keep-newlines only applies with --split-sentences")
        self.tokenizer.validate()

    @property
    def level(self) -> str:
        """Megatron's name for what one sequence is: `sentence` when split, else `document`."""
        return "sentence" if self.split_sentences else "document"
