"""Stage 2: the mixture planner. Per-domain stats in, tokens per (domain, length bucket) out.

Every domain d has two length buckets, short (<= T tokens) and long (> T), with unique token
counts S_d and L_d (from the stats files only; nothing is re-tokenized). With target domain
shares w_d and a budget of B training tokens, each strategy decides the long share inside each
domain and the final domain shares; then each bucket gets target tokens X_db, a repeat factor
X_db / unique_db (epochs; < 1 means subsampled) and a sampling weight X_db / B:

- `original`: shares w_d, natural long share l_d = L_d / (S_d + L_d).
- `per-source` (the paper's choice): shares w_d kept exactly; inside each domain the long share
  becomes max(l_d, p) (`--long-fraction p`, never lowering a naturally long domain such as Books),
  or L_d / (L_d + k S_d) (`--short-keep-ratio k`: keep each short document with probability k,
  as the released code does with k = 0.1).
- `global`: the same upsampling applied to the whole mix regardless of domain: one keep ratio k
  for short documents everywhere (given, or solved so the overall long share is p), so domain d's
  mass becomes w_d (l_d + k s_d) and the domain shares drift toward long-rich domains.
- `cut` ("Cut at 4K"): shares w_d, natural documents cut into pieces of at most `--cut-length`
  tokens, so no sample carries a dependency longer than that.
- `domain-upsample`: w_d multiplied by `--upweight` factors and renormalised, natural lengths.

Held-out documents (`--valid-fraction f`): the last `held_out_count(n, f)` documents
of each dataset never reach training, so every number is computed over the training part: the
stats give each bucket's whole-dataset counts, the held-out tail's exact counts come from the
.idx (12 bytes per document, memory-mapped), and unique tokens, natural long shares, domain
shares and repeat factors (hence the `--max-epochs` warning) use the difference. Before, repeat
factors divided by whole-dataset tokens, so training drew (1 - f) of the planned tokens from
each bucket and the audit drifted with f (up to 3-7% at f = 0.9). A domain whose held-out count
rounds to 0 is named in a warning; a bucket with a target and no training documents is an
error (the stock-Megatron blend silently dropped it and renormalised the others).

Inputs are checked first (`data.stats.load_checked_stats`): each stats file against the
.idx/.bin beside it (documents, tokens, the .idx's sha256) and against its run's completion
marker, so stats left by an interrupted or earlier preprocessing run are refused, naming both
files. Weights must be finite; domains a weights file does not mention get 0% with a warning.

Trade-off in numbers (paper, SlimPajama): per-source at p = 0.7 raises CommonCrawl's long share
from ~30% to 70% while its domain share stays 53.4%; global at the same overall long share moves
Books and ArXiv up by several points each, which the paper shows hurts.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import numpy as np

from megatron_longctx.config.mixture import SLIMPAJAMA_SHARES, MixtureConfig
from megatron_longctx.data.indexed import file_sha256, read_index
from megatron_longctx.data.stats import (
    documents_longer_than,
    load_checked_stats,
    tokens_longer_than,
)
from megatron_longctx.mixture.plan import (
    BUCKETS,
    SHARE_SUM_TOLERANCE,
    BucketPlan,
    DomainPlan,
    MixturePlan,
    PlanFileError,
    PlanTokenizer,
    PlanTotals,
    held_out_count,
    load_json_unique,
)


class PlanError(Exception):
    """The plan cannot be made (missing domain, empty bucket with a target, bad weights)."""


def _norm(name: str) -> str:
    return name.lower().removeprefix("redpajama")


def match_domain(name: str, domains: list[str]) -> str | None:
    """Find `name` among `domains`, exactly or ignoring case and a `RedPajama` prefix."""
    if name in domains:
        return name
    hits = [d for d in domains if _norm(d) == _norm(name)]
    return hits[0] if len(hits) == 1 else None


def load_domain_stats(prefixes: list[str]) -> list[dict[str, Any]]:
    """One entry per dataset prefix: its domain, checked stats and path; domains must be unique
    and share one tokenizer.

    Raises:
        FileNotFoundError: a prefix without stats file.
        DatasetError: stats that do not describe their dataset, a damaged dataset, or a
            dataset left by an interrupted or earlier run (`load_checked_stats`).
        PlanError: a domain twice, or datasets made with different tokenizers.
    """
    entries = []
    for prefix in prefixes:
        path = prefix + ".stats.json"
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--data-prefix {prefix!r}: no stats file {path} (a dataset without stats is "
                "incomplete, or left over from an earlier run into the same prefix: rerun "
                "tools/preprocess_data.py, or delete it)")
        stats = load_checked_stats(prefix)
        domain = stats.get("domain") or os.path.basename(prefix)
        entries.append({"prefix": prefix, "stats_path": path, "domain": domain, "stats": stats})
    seen: dict[str, str] = {}
    for e in entries:
        if e["domain"] in seen:
            raise PlanError(
                f"--data-prefix: domain {e['domain']!r} appears twice ({seen[e['domain']]} and "
                f"{e['prefix']}); merge shards first (tools/merge_datasets.py)"
            )
        seen[e["domain"]] = e["prefix"]
    first = entries[0]
    for e in entries[1:]:
        a, b = first["stats"]["tokenizer"], e["stats"]["tokenizer"]
        if a.get("sha256") != b.get("sha256"):
            raise PlanError(
                f"--data-prefix: datasets were tokenized with different tokenizers: "
                f"{first['stats_path']} (sha256 {str(a.get('sha256'))[:12]}, "
                f"{a.get('tokenizer_model')}) and {e['stats_path']} (sha256 "
                f"{str(b.get('sha256'))[:12]}, {b.get('tokenizer_model')})")
    return entries


def _weights_file(path: str) -> dict[str, float]:
    """{domain: weight} from a JSON file; every weight a finite number >= 0, each domain
    once (a duplicate key is refused: JSON would keep the last one silently)."""
    try:
        with open(path, encoding="utf-8") as fh:
            given = load_json_unique(fh, path)
    except PlanFileError as err:
        raise PlanError(f"--domain-weights {err}") from err
    except (OSError, ValueError) as err:
        raise PlanError(f"--domain-weights {path!r}: {err}") from err
    if not isinstance(given, dict):
        raise PlanError(f"--domain-weights {path!r}: expected {{domain: non-negative number}}")
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0):
            raise PlanError(f"--domain-weights {path!r}: {name!r}: weight must be a finite "
                            f"number >= 0, got {value!r}")
    return given


def resolve_weights(cfg: MixtureConfig, entries: list[dict[str, Any]],
                    warnings: list[str] | None = None) -> dict[str, float]:
    """Target domain shares (summing to 1) over the domains present.

    Domains with a dataset but no weight in the weights (file or the SlimPajama table) get 0%,
    named in `warnings`. A weights file whose values do not sum to 1 is read as relative
    weights and normalised, named in `warnings` with its sum (a plan file's shares, by
    contrast, must sum to 1: mixture/plan.py refuses them).
    """
    domains = [e["domain"] for e in entries]
    if cfg.domain_weights == "natural":
        raw = {e["domain"]: float(e["stats"]["tokens"]) for e in entries}
    else:
        given = (SLIMPAJAMA_SHARES if cfg.domain_weights == "slimpajama"
                 else _weights_file(cfg.domain_weights))
        given_sum = sum(given.values())
        if cfg.domain_weights != "slimpajama" and warnings is not None and \
                abs(given_sum - 1.0) > SHARE_SUM_TOLERANCE:
            warnings.append(f"--domain-weights {cfg.domain_weights}: weights sum to "
                            f"{given_sum:g}, not 1: normalised (each divided by {given_sum:g})")
        raw = {}
        for name, weight in given.items():
            match = match_domain(name, domains)
            if match is None:
                if weight > 0:
                    raise PlanError(
                        f"--domain-weights: domain {name!r} has weight {weight} but no dataset "
                        f"among --data-prefix (domains: {', '.join(domains)}); pass its dataset "
                        "or use --domain-weights natural or a JSON file"
                    )
                continue
            raw[match] = float(weight)
        unweighted = [d for d in domains if d not in raw]
        if unweighted and warnings is not None:
            warnings.append(f"--domain-weights {cfg.domain_weights}: no weight for "
                            f"{', '.join(unweighted)}: not trained on (0%)")
        for d in unweighted:
            raw[d] = 0.0
    if cfg.strategy == "domain-upsample":
        for name, factor in cfg.upweight.items():
            match = match_domain(name, domains)
            if match is None:
                raise PlanError(f"--upweight: unknown domain {name!r} (domains: "
                                f"{', '.join(domains)})")
            raw[match] *= factor
    total = sum(raw.values())
    if total <= 0:
        raise PlanError("--domain-weights: all weights are zero")
    if not math.isfinite(total):
        raise PlanError(f"--domain-weights: weights sum to {total} (not finite)")
    return {d: raw[d] / total for d in domains}


def _domain_long_shares(
    cfg: MixtureConfig, weights: dict[str, float], natural: dict[str, float],
    warnings: list[str],
) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """Per strategy: (long share inside each domain, final domain shares, details)."""
    details: dict[str, Any] = {}
    if cfg.strategy in ("original", "cut", "domain-upsample"):
        return dict(natural), dict(weights), details
    rule, value = cfg.resolved_long_rule()
    details[rule] = value
    if cfg.strategy == "per-source":
        long_share = {}
        for d, ld in natural.items():
            if ld == 0.0:
                warnings.append(f"{d}: no documents longer than {cfg.long_threshold} tokens; "
                                "its long share stays 0")
                long_share[d] = 0.0
            elif rule == "long_fraction":
                long_share[d] = max(ld, value)
            else:
                long_share[d] = ld / (ld + value * (1.0 - ld))
        return long_share, dict(weights), details
    # global: one keep ratio k for short documents, whatever their domain
    if rule == "short_keep_ratio":
        k = value
    else:
        long_mass = sum(weights[d] * natural[d] for d in weights)
        short_mass = sum(weights[d] * (1.0 - natural[d]) for d in weights)
        if long_mass == 0.0:
            raise PlanError(f"--strategy global: no documents longer than {cfg.long_threshold} "
                            "tokens in any domain")
        k = 1.0 if short_mass == 0.0 else min(1.0, long_mass * (1 - value) / (value * short_mass))
    details["global_short_keep_ratio"] = k
    mass = {d: weights[d] * (natural[d] + k * (1.0 - natural[d])) for d in weights}
    total = sum(mass.values())
    shares = {d: m / total for d, m in mass.items()}
    long_share = {d: (natural[d] / (natural[d] + k * (1.0 - natural[d]))) if mass[d] > 0 else 0.0
                  for d in weights}
    return long_share, shares, details


def held_out_buckets(prefix: str, threshold: int, valid_fraction: float) -> dict[str, Any]:
    """Exact documents and tokens per bucket in a dataset's held-out tail (from its .idx)."""
    out: dict[str, Any] = {"documents": 0, "short": (0, 0), "long": (0, 0)}
    if valid_fraction <= 0:
        return out
    lengths = read_index(prefix).document_lengths()
    held = held_out_count(len(lengths), valid_fraction)
    tail = lengths[len(lengths) - held:] if held else lengths[:0]
    is_long = tail > threshold
    out["documents"] = held
    out["short"] = (int((~is_long).sum()), int(tail[~is_long].sum(dtype=np.int64)))
    out["long"] = (int(is_long.sum()), int(tail[is_long].sum(dtype=np.int64)))
    return out


def _bucket_inputs(cfg: MixtureConfig, entries: list[dict[str, Any]],
                   warnings: list[str]) -> dict[str, Any]:
    """Per domain, from its stats and held-out tail: whole-dataset documents and tokens per
    bucket, the held-out part, and the training part's natural long share and tokens."""
    natural: dict[str, float] = {}
    unique: dict[str, dict[str, float]] = {}
    docs: dict[str, dict[str, float]] = {}
    held: dict[str, dict[str, Any]] = {}
    train_tokens: dict[str, float] = {}
    no_held_out = []
    for e in entries:
        s, d = e["stats"], e["domain"]
        long_tokens = tokens_longer_than(s, cfg.long_threshold)
        long_docs = documents_longer_than(s, cfg.long_threshold)
        unique[d] = {"short": s["tokens"] - long_tokens, "long": long_tokens}
        docs[d] = {"short": s["documents"] - long_docs, "long": long_docs}
        held[d] = held_out_buckets(e["prefix"], cfg.long_threshold, cfg.valid_fraction)
        if cfg.valid_fraction > 0 and held[d]["documents"] == 0:
            no_held_out.append(f"{d} ({s['documents']} documents)")
        train_long = long_tokens - held[d]["long"][1]
        train_tokens[d] = s["tokens"] - held[d]["short"][1] - held[d]["long"][1]
        natural[d] = train_long / train_tokens[d] if train_tokens[d] > 0 else 0.0
    if no_held_out:
        warnings.append(f"--valid-fraction {cfg.valid_fraction:g} holds out no documents of "
                        f"{', '.join(no_held_out)}: no validation data for them")
    return {"natural": natural, "unique": unique, "docs": docs, "held": held,
            "train_tokens": train_tokens}


def _bucket_plans(cfg: MixtureConfig, domain: str, targets: dict[str, float],
                  inputs: dict[str, Any], warnings: list[str]) -> tuple[BucketPlan, BucketPlan]:
    """The domain's (short, long) buckets: target tokens, repeat factors, blend weights."""
    budget = float(cfg.train_tokens)
    buckets = []
    for b in BUCKETS:
        avail = inputs["unique"][domain][b]
        held_docs, held_tokens = inputs["held"][domain][b]
        train = max(avail - held_tokens, 0.0)
        target = targets[b]
        if target > 0 and train <= 0:
            what = "longer than" if b == "long" else "of at most"
            has_none = (f"the dataset's training part has none (its {held_docs} are held out "
                        f"by --valid-fraction {cfg.valid_fraction:g})" if held_docs
                        else "the dataset has none")
            raise PlanError(
                f"{domain}: the budget needs {target:.3g} tokens from documents {what} "
                f"{cfg.long_threshold} tokens, but {has_none}; change --domain-weights, "
                "--long-threshold, --valid-fraction or the data"
            )
        repeat = target / train if train > 0 else 0.0
        if repeat > cfg.max_epochs:
            warnings.append(f"{domain}/{b}: repeats {repeat:.2f} times (> --max-epochs "
                            f"{cfg.max_epochs:g}); add data or lower --train-tokens")
        buckets.append(BucketPlan(
            name=b,
            min_length=1 if b == "short" else cfg.long_threshold + 1,
            max_length=cfg.long_threshold if b == "short" else None,
            documents=inputs["docs"][domain][b],
            unique_tokens=avail,
            target_tokens=target,
            repeat=repeat,
            sampling_weight=target / budget,
            held_out_documents=held_docs,
            held_out_tokens=held_tokens,
        ))
    return buckets[0], buckets[1]


def _provenance(entry: dict[str, Any]) -> dict[str, Any]:
    """What the domain's plan was made from: stats file hash, .idx/.bin sizes."""
    prefix = entry["prefix"]
    return {"stats_sha256": file_sha256(entry["stats_path"]),
            "idx_bytes": os.path.getsize(prefix + ".idx"),
            "bin_bytes": os.path.getsize(prefix + ".bin")}


def _domain_plans(cfg: MixtureConfig, entries: list[dict[str, Any]], inputs: dict[str, Any],
                  weights: dict[str, float], long_share: dict[str, float],
                  shares: dict[str, float], warnings: list[str]) -> list[DomainPlan]:
    budget = float(cfg.train_tokens)
    total_train = sum(inputs["train_tokens"].values())
    domains = []
    for e in entries:
        d = e["domain"]
        domain_budget = shares[d] * budget
        targets = {"short": domain_budget * (1.0 - long_share[d]),
                   "long": domain_budget * long_share[d]}
        held = inputs["held"][d]
        domains.append(DomainPlan(
            domain=d,
            prefix=e["prefix"],
            stats=e["stats_path"],
            documents=e["stats"]["documents"],
            tokens=e["stats"]["tokens"],
            natural_share=inputs["train_tokens"][d] / total_train if total_train else 0.0,
            weight_share=weights[d],
            target_share=shares[d],
            long_share_before=inputs["natural"][d],
            long_share_after=0.0 if cfg.strategy == "cut" else long_share[d],
            buckets=_bucket_plans(cfg, d, targets, inputs, warnings),
            held_out_documents=held["documents"],
            held_out_tokens=held["short"][1] + held["long"][1],
            provenance=_provenance(e),
        ))
    return domains


def plan_mixture(cfg: MixtureConfig) -> MixturePlan:
    """Compute the plan (pure: reads stats files and .idx files only, writes nothing)."""
    cfg.validate()
    entries = load_domain_stats(cfg.data_prefixes)
    warnings: list[str] = []
    weights = resolve_weights(cfg, entries, warnings)
    inputs = _bucket_inputs(cfg, entries, warnings)
    long_share, shares, details = _domain_long_shares(cfg, weights, inputs["natural"], warnings)
    domains = _domain_plans(cfg, entries, inputs, weights, long_share, shares, warnings)
    budget = float(cfg.train_tokens)
    plan = MixturePlan(
        strategy=cfg.strategy,
        parameters=copy.deepcopy(cfg),
        details=details,
        train_tokens=budget,
        seq_length=cfg.seq_length,
        train_samples=math.ceil(budget / cfg.seq_length),
        long_threshold=cfg.long_threshold,
        cut_length=cfg.cut_length if cfg.strategy == "cut" else None,
        tokenizer=_plan_tokenizer(entries[0]["stats"]["tokenizer"]),
        domains=tuple(domains),
        totals=PlanTotals(
            unique_tokens=sum(e["stats"]["tokens"] for e in entries),
            long_share_before=sum(x.weight_share * x.long_share_before for x in domains),
            long_share_after=sum(x.target_share * x.long_share_after for x in domains),
            max_repeat=max(b.repeat for x in domains for b in x.buckets),
        ),
        warnings=tuple(warnings),
    )
    try:
        MixturePlan.from_json(plan.to_json(), "the computed plan")  # same checks as a load
    except ValueError as err:
        raise PlanError(f"{err} (check --domain-weights and the stats files)") from err
    return plan


def _plan_tokenizer(record: dict[str, Any]) -> PlanTokenizer:
    """The stats file's tokenizer record, typed (vocab size, EOD, sha256; the rest kept)."""
    rest = {k: v for k, v in record.items() if k not in ("vocab_size", "eod", "sha256")}
    return PlanTokenizer(vocab_size=int(record["vocab_size"]), eod=int(record["eod"]),
                         sha256=record.get("sha256") or "", details=rest)
