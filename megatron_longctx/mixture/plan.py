"""The mixture plan: stage 2's contract with training and evaluation (`mixture_plan.json`).

`MixturePlan` (with `DomainPlan`, `BucketPlan`, `PlanTokenizer`, `PlanTotals`) is the one typed
form of the plan file. The planner builds it; `save` writes it atomically (temporary file +
rename, `megatron_longctx.atomic`), `load` reads it back and validates every field, naming the
file and the field ("mixture_plan.json: domains[2].buckets[1].repeat: must be >= 0, got -1").
Every other module reads attributes; nothing outside this module indexes the JSON.

What the plan file does not hold: the realised views. They are a pure function of the plan and
the stage-1 indexes (`held_out_count` below, the long threshold, the documents' lengths), so the
view writer (`outputs.py`), the training dataset (`dataset.py`) and the audit derive them the
same way instead of the writer adding a `realization` section that the dataset reads back
(format 1 did; a plan edited after planning could then disagree with its own views). The views
live in `views/` beside the plan file (`MixturePlan.views_dir`).

The held-out split lives here too: a domain of n documents with `--valid-fraction f` holds out
its last `held_out_count(n, f)` documents, for the views, the blend files, the training dataset
(which sets its split ranges from this function) and the loss-by-position evaluation. The
count is megatron's own `--split` arithmetic on `split_string(f)`: n - round(r * n) with r the
normalised train ratio, i.e. round(f * n) except at an exact half (n = 115, f = 0.1: 11.5 ->
11 held out, where Python's round gives 12). Keeping megatron's rule keeps every held-out set,
blend file and training sample of format 1 unchanged (tests pin them) and lets a stock
Megatron-LM run given `--split split_string(f)` hold out the same documents. What was broken
was the string: `f"{f:.10g}"` wrote 5e-05, which megatron's parser (digits and dots only)
reads as 5 and 05, so 91% of the documents were held out; `split_string` now writes plain
decimals (0.00005).

Format 3 records the held-out tail per domain and bucket (`held_out_documents`,
`held_out_tokens`; repeat factors are relative to the training part, `train_unique_tokens`)
and each domain's provenance (stats sha256, .idx/.bin sizes, checked by the training
dataset); every number must be finite. Format-2 files still load (those fields 0 / empty).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from megatron_longctx.atomic import write_json_atomic
from megatron_longctx.config.mixture import STRATEGIES, MixtureConfig

#: Format 2: no `realization` section (views are derived from the plan). Format 3
#: adds held-out counts per domain and bucket (repeat factors are over the training part) and
#: each domain's provenance (stats sha256, .idx/.bin sizes); format-2 files still load, with
#: those fields 0 / empty (their repeat factors were computed over whole datasets).
PLAN_FORMAT = "megatron_longctx.mixture_plan/3"
READABLE_FORMATS = ("megatron_longctx.mixture_plan/2", PLAN_FORMAT)
PLAN_FILE = "mixture_plan.json"
VIEWS_DIR = "views"
BUCKETS = ("short", "long")
#: Shares are validated to [0, 1]; this slack absorbs float rounding of computed shares.
_SHARE_MAX = 1.0 + 1e-9


class PlanFileError(ValueError):
    """A plan file that cannot be read: the message names the file and the field."""


#: How far the domains' target shares may sum from 1 (float rounding of computed shares).
SHARE_SUM_TOLERANCE = 1e-6


def load_json_unique(handle: Any, file: str) -> Any:
    """`json.load` that refuses a key given twice in one object (json keeps the last one
    silently), naming the key and `file`.

    Raises:
        PlanFileError: (a ValueError) for a duplicate key; json's own errors otherwise.
    """
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise PlanFileError(f"{file}: duplicate key {key!r} (JSON keeps only the last)")
            out[key] = value
        return out

    return json.load(handle, object_pairs_hook=pairs)


# --------------------------------------------------------------------------------------------
# held-out split
# --------------------------------------------------------------------------------------------
def held_out_count(n_documents: int, valid_fraction: float) -> int:
    """Documents a dataset of `n_documents` holds out at `--valid-fraction`: ~round(f * n).

    Exactly megatron-core's split of `split_string(f)` (train = round(r * n), r the
    normalised train ratio of the string), so the two can never disagree; it differs from
    round(f * n) only at an exact half (module docstring).
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    train, held = (float(x) for x in split_string(valid_fraction).split(",")[:2])
    return n_documents - int(round(train / (train + held) * float(n_documents)))


def split_documents(n_documents: int, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train document ids, held-out ids): the last `held_out_count` documents are held out."""
    n_train = n_documents - held_out_count(n_documents, valid_fraction)
    return (np.arange(n_train, dtype=np.int64),
            np.arange(n_train, n_documents, dtype=np.int64))


def _decimal(x: float) -> str:
    text = f"{x:.10g}"
    return np.format_float_positional(x, trim="-") if "e" in text else text


def split_string(valid_fraction: float) -> str:
    """A `--split` string for megatron's config ("train,valid,0", plain decimals only).

    megatron's parser keeps digits and dots (`5e-05` becomes 5 and 05), so exponents are
    written out (0.00005); ordinary fractions keep format 1's text (0.95,0.05,0), hence the
    same megatron index-cache keys. The training dataset takes its ranges from
    `split_documents` (the same numbers), so the string only tells megatron which splits exist.
    """
    return f"{_decimal(1.0 - valid_fraction)},{_decimal(valid_fraction)},0"


def view_prefix(views_dir: str, domain: DomainPlan, group: str) -> str:
    """The view of `domain` for `group` ("short", "long", "cut" or "valid") in `views_dir`."""
    return os.path.join(views_dir, f"{os.path.basename(domain.prefix)}_{group}")


# --------------------------------------------------------------------------------------------
# reading JSON with the file and field in every message
# --------------------------------------------------------------------------------------------
class _Fields:
    """Typed access to one JSON object; errors name `file: where.key`."""

    def __init__(self, data: Any, file: str, where: str) -> None:
        if not isinstance(data, Mapping):
            raise PlanFileError(f"{file}: {where or 'top level'}: must be an object")
        self.data, self.file, self.where = data, file, where

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, message: str) -> PlanFileError:
        return PlanFileError(f"{self.file}: {self.path(key)}: {message}")

    def get(self, key: str, optional: bool = False) -> Any:
        if key not in self.data:
            if optional:
                return None
            raise self.fail(key, "missing")
        return self.data[key]

    def number(self, key: str, minimum: float | None = None, maximum: float | None = None,
               integer: bool = False, optional: bool = False) -> Any:
        value = self.get(key, optional)
        if value is None and optional:
            return None
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            raise self.fail(key, f"must be {'an integer' if integer else 'a number'}, "
                                 f"got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be >= {minimum:g}, got {value!r}")
        if maximum is not None and value > maximum:
            raise self.fail(key, f"must be <= {maximum:g}, got {value!r}")
        return value

    def text(self, key: str, choices: tuple[str, ...] | None = None) -> str:
        value = self.get(key)
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        if choices is not None and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def items(self, key: str) -> list[Any]:
        value = self.get(key)
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, got {type(value).__name__}")
        return value

    def child(self, key: str, index: int | None = None) -> _Fields:
        where = self.path(key) + ("" if index is None else f"[{index}]")
        value = self.get(key) if index is None else self.items(key)[index]
        return _Fields(value, self.file, where)


# --------------------------------------------------------------------------------------------
# the contract
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BucketPlan:
    """One length bucket of a domain: documents of `min_length`..`max_length` tokens."""

    #: "short" (<= long_threshold tokens) or "long".
    name: str
    min_length: int
    #: None for the long bucket (no upper bound).
    max_length: int | None
    #: Documents in the bucket (whole dataset, held-out ones included; from the stats file).
    documents: float
    #: Tokens in the bucket's documents (whole dataset).
    unique_tokens: float
    #: Tokens the training run draws from the bucket.
    target_tokens: float
    #: target_tokens / train_unique_tokens: epochs over the bucket's training documents
    #: (< 1: subsampled).
    repeat: float
    #: target_tokens / the plan's train_tokens (a Megatron blend weight).
    sampling_weight: float
    #: Of `documents` / `unique_tokens`, those in the held-out tail (--valid-fraction; exact,
    #: from the .idx). 0 in format-2 plans.
    held_out_documents: int = 0
    held_out_tokens: int = 0

    @property
    def train_unique_tokens(self) -> float:
        """Tokens of the bucket's training documents (what `repeat` is relative to)."""
        return self.unique_tokens - self.held_out_tokens

    @classmethod
    def from_json(cls, f: _Fields) -> BucketPlan:
        return cls(
            name=f.text("name", BUCKETS), min_length=f.number("min_length", 1, integer=True),
            max_length=f.number("max_length", 1, integer=True, optional=True),
            documents=f.number("documents", 0), unique_tokens=f.number("unique_tokens", 0),
            target_tokens=f.number("target_tokens", 0), repeat=f.number("repeat", 0),
            sampling_weight=f.number("sampling_weight", 0, _SHARE_MAX),
            held_out_documents=f.number("held_out_documents", 0, integer=True, optional=True) or 0,
            held_out_tokens=f.number("held_out_tokens", 0, integer=True, optional=True) or 0,
        )


@dataclass(frozen=True)
class DomainPlan:
    """One domain (one stage-1 dataset) of the plan."""

    domain: str
    #: The stage-1 dataset prefix (`{prefix}.bin/.idx`).
    prefix: str
    #: Its stats file.
    stats: str
    documents: int
    tokens: int
    #: Share of the domain's training tokens (held-out documents excluded) in the data as it is.
    natural_share: float
    #: Target share from --domain-weights (before the strategy).
    weight_share: float
    #: Share of the training budget after the strategy (the blend weight of the domain).
    target_share: float
    #: Share of the domain's tokens in long documents, in the training data and in the plan.
    long_share_before: float
    long_share_after: float
    #: (short, long).
    buckets: tuple[BucketPlan, BucketPlan]
    #: The held-out tail of --valid-fraction (0 in format-2 plans).
    held_out_documents: int = 0
    held_out_tokens: int = 0
    #: What the domain was planned from: {"stats_sha256", "idx_bytes", "bin_bytes"} (empty in
    #: format-2 plans); the training dataset checks the sizes and the document count.
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def target_tokens(self) -> float:
        return sum(b.target_tokens for b in self.buckets)

    @property
    def repeats(self) -> list[float]:
        """[repeat of short, repeat of long], the training dataset's upsampling factors."""
        return [b.repeat for b in self.buckets]

    @classmethod
    def from_json(cls, f: _Fields) -> DomainPlan:
        n = len(f.items("buckets"))
        if n != len(BUCKETS):
            raise f.fail("buckets", f"must list {len(BUCKETS)} buckets {BUCKETS}, got {n}")
        buckets = tuple(BucketPlan.from_json(f.child("buckets", i)) for i in range(n))
        for i, (bucket, name) in enumerate(zip(buckets, BUCKETS)):
            if bucket.name != name:
                raise f.fail(f"buckets[{i}].name", f"must be {name!r}, got {bucket.name!r}")
        shares = {k: f.number(k, 0, _SHARE_MAX) for k in ("natural_share", "weight_share",
                  "target_share", "long_share_before", "long_share_after")}
        provenance = f.get("provenance", optional=True) or {}
        if not isinstance(provenance, dict):
            raise f.fail("provenance", f"must be an object, got {provenance!r}")
        return cls(domain=f.text("domain"), prefix=f.text("prefix"), stats=f.text("stats"),
                   documents=f.number("documents", 0, integer=True),
                   tokens=f.number("tokens", 0, integer=True), buckets=buckets,
                   held_out_documents=f.number("held_out_documents", 0, integer=True,
                                               optional=True) or 0,
                   held_out_tokens=f.number("held_out_tokens", 0, integer=True,
                                            optional=True) or 0,
                   provenance=dict(provenance), **shares)


@dataclass(frozen=True)
class PlanTokenizer:
    """The tokenizer the stage-1 datasets were made with (from their stats files)."""

    vocab_size: int
    eod: int
    sha256: str = ""
    #: The rest of the stats file's record (type, model path ...), kept for traceability.
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.details, "vocab_size": self.vocab_size, "eod": self.eod,
                "sha256": self.sha256}

    @classmethod
    def from_json(cls, f: _Fields) -> PlanTokenizer:
        sha = f.get("sha256", optional=True) or ""
        if not isinstance(sha, str):
            raise f.fail("sha256", f"must be a string, got {sha!r}")
        rest = {k: v for k, v in f.data.items() if k not in ("vocab_size", "eod", "sha256")}
        return cls(vocab_size=f.number("vocab_size", 1, integer=True),
                   eod=f.number("eod", 0, integer=True), sha256=sha, details=rest)


@dataclass(frozen=True)
class PlanTotals:
    """Whole-plan figures for the report and the console table."""

    unique_tokens: int
    long_share_before: float
    long_share_after: float
    max_repeat: float

    @classmethod
    def from_json(cls, f: _Fields) -> PlanTotals:
        return cls(unique_tokens=f.number("unique_tokens", 0, integer=True),
                   long_share_before=f.number("long_share_before", 0, _SHARE_MAX),
                   long_share_after=f.number("long_share_after", 0, _SHARE_MAX),
                   max_repeat=f.number("max_repeat", 0))


@dataclass(frozen=True)
class MixturePlan:
    """Tokens per (domain, length bucket) for one training budget: `mixture_plan.json`."""

    strategy: str
    #: Everything `tools/blend_mixture.py` was given.
    parameters: MixtureConfig
    #: The strategy's resolved rule ({"long_fraction": 0.7}, global keep ratio ...).
    details: dict[str, float]
    train_tokens: float
    seq_length: int
    #: ceil(train_tokens / seq_length).
    train_samples: int
    long_threshold: int
    #: `cut` only: pieces of at most this many tokens.
    cut_length: int | None
    tokenizer: PlanTokenizer
    domains: tuple[DomainPlan, ...]
    totals: PlanTotals
    warnings: tuple[str, ...] = ()
    format: str = PLAN_FORMAT
    #: The file this plan was loaded from (not saved); locates `views/`.
    source: str | None = field(default=None, compare=False, repr=False)

    @property
    def valid_fraction(self) -> float:
        return self.parameters.valid_fraction

    @property
    def seed(self) -> int:
        return self.parameters.seed

    @property
    def active_domains(self) -> list[DomainPlan]:
        """Domains with a positive target share: the datasets training blends, in order."""
        return [d for d in self.domains if d.target_share > 0]

    @property
    def views_dir(self) -> str:
        """`views/` beside the plan file (where `outputs.write_plan_outputs` put them)."""
        if self.source is None:
            raise ValueError("this plan was not loaded from a file: load it with "
                             "load_plan(PATH/mixture_plan.json) to find its views/")
        return os.path.join(os.path.dirname(os.path.abspath(self.source)), VIEWS_DIR)

    def to_json(self) -> dict[str, Any]:
        """The plan file's content (key order as format 1 wrote it)."""
        return {
            "format": self.format, "strategy": self.strategy,
            "parameters": asdict(self.parameters), "details": dict(self.details),
            "train_tokens": self.train_tokens, "seq_length": self.seq_length,
            "train_samples": self.train_samples, "long_threshold": self.long_threshold,
            "cut_length": self.cut_length, "tokenizer": self.tokenizer.to_json(),
            "domains": [{**{k.name: getattr(d, k.name) for k in fields(d) if k.name != "buckets"},
                         "buckets": [asdict(b) for b in d.buckets]} for d in self.domains],
            "totals": asdict(self.totals), "warnings": list(self.warnings),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan file atomically (temporary file + rename)."""
        write_json_atomic(path, self.to_json())

    @classmethod
    def from_json(cls, data: Any, file: str = PLAN_FILE) -> MixturePlan:
        """Validate a parsed plan file; errors name `file` and the field."""
        top = _Fields(data, file, "")
        fmt = top.get("format")
        if fmt not in READABLE_FORMATS:
            raise top.fail("format", f"expected {PLAN_FORMAT!r}, got {fmt!r}: not a plan of this "
                                     "version; re-run tools/blend_mixture.py (--mixture-plan)")
        domains = tuple(DomainPlan.from_json(top.child("domains", i))
                        for i in range(len(top.items("domains"))))
        if not domains:
            raise top.fail("domains", "must list at least one domain")
        total = sum(d.target_share for d in domains)
        if abs(total - 1.0) > SHARE_SUM_TOLERANCE:
            # Megatron's BlendedDataset would renormalise the weights without a word.
            raise top.fail("domains", f"target_share values sum to {total:.6g}, not 1 (an "
                                      "edited plan? re-run tools/blend_mixture.py)")
        warnings = top.items("warnings")
        return cls(
            strategy=top.text("strategy", STRATEGIES), parameters=_parameters(top),
            details=_details(top), train_tokens=top.number("train_tokens", 1),
            seq_length=top.number("seq_length", 1, integer=True),
            train_samples=top.number("train_samples", 1, integer=True),
            long_threshold=top.number("long_threshold", 1, integer=True),
            cut_length=top.number("cut_length", 1, integer=True, optional=True),
            tokenizer=PlanTokenizer.from_json(top.child("tokenizer")), domains=domains,
            totals=PlanTotals.from_json(top.child("totals")),
            warnings=tuple(str(w) for w in warnings), format=fmt,
        )


def _parameters(top: _Fields) -> MixtureConfig:
    """`parameters`: a MixtureConfig, validated by its own rules (which name the CLI flag)."""
    params = top.child("parameters")
    known = {f.name for f in fields(MixtureConfig)}
    unknown = sorted(set(params.data) - known)
    if unknown:
        raise top.fail("parameters", f"unknown field(s) {', '.join(unknown)}")
    try:
        cfg = MixtureConfig(**params.data)
        cfg.validate()
    except (TypeError, ValueError) as err:
        raise top.fail("parameters", str(err)) from err
    return cfg


def _details(top: _Fields) -> dict[str, float]:
    details = top.child("details")
    return {k: details.number(k) for k in details.data}


def load_plan(path: str | os.PathLike) -> MixturePlan:
    """Read and validate a plan file (`--mixture-plan`); remembers `path` as its source."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = load_json_unique(handle, path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlanFileError(f"{path}: not JSON ({err}) (--mixture-plan)") from err
    return replace(MixturePlan.from_json(data, path), source=path)
