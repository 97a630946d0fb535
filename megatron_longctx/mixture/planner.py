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

Trade-off in numbers (paper, SlimPajama): per-source at p = 0.7 raises CommonCrawl's long share
from ~30% to 70% while its domain share stays 53.4%; global at the same overall long share moves
Books and ArXiv up by several points each, which the paper shows hurts.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

from megatron_longctx.config.mixture import SLIMPAJAMA_SHARES, MixtureConfig
from megatron_longctx.data.stats import documents_longer_than, load_stats, tokens_longer_than
from megatron_longctx.mixture.plan import (
    BUCKETS,
    BucketPlan,
    DomainPlan,
    MixturePlan,
    PlanTokenizer,
    PlanTotals,
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
    """One entry per dataset prefix: its domain, stats and path; domains must be unique."""
    entries = []
    for prefix in prefixes:
        path = prefix + ".stats.json"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data-prefix {prefix!r}: no stats file {path}")
        stats = load_stats(path)
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
    shas = {e["stats"]["tokenizer"].get("sha256") for e in entries}
    if len(shas) > 1:
        raise PlanError("--data-prefix: datasets were tokenized with different tokenizers")
    return entries


def resolve_weights(cfg: MixtureConfig, entries: list[dict[str, Any]]) -> dict[str, float]:
    """Target domain shares (summing to 1) over the domains present."""
    domains = [e["domain"] for e in entries]
    if cfg.domain_weights == "natural":
        raw = {e["domain"]: float(e["stats"]["tokens"]) for e in entries}
    else:
        if cfg.domain_weights == "slimpajama":
            given = SLIMPAJAMA_SHARES
        else:
            try:
                with open(cfg.domain_weights) as fh:
                    given = json.load(fh)
            except (OSError, json.JSONDecodeError) as err:
                raise PlanError(f"--domain-weights {cfg.domain_weights!r}: {err}") from err
            if not isinstance(given, dict) or not all(
                isinstance(v, (int, float)) and v >= 0 for v in given.values()
            ):
                raise PlanError(f"--domain-weights {cfg.domain_weights!r}: expected "
                                "{domain: non-negative number}")
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
        for d in domains:
            raw.setdefault(d, 0.0)
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


def _bucket_inputs(cfg: MixtureConfig, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per domain, from its stats: natural long share, unique tokens and documents per bucket."""
    natural: dict[str, float] = {}
    unique: dict[str, dict[str, float]] = {}
    docs: dict[str, dict[str, float]] = {}
    for e in entries:
        s = e["stats"]
        long_tokens = tokens_longer_than(s, cfg.long_threshold)
        long_docs = documents_longer_than(s, cfg.long_threshold)
        unique[e["domain"]] = {"short": s["tokens"] - long_tokens, "long": long_tokens}
        docs[e["domain"]] = {"short": s["documents"] - long_docs, "long": long_docs}
        natural[e["domain"]] = long_tokens / s["tokens"] if s["tokens"] else 0.0
    return {"natural": natural, "unique": unique, "docs": docs}


def _bucket_plans(cfg: MixtureConfig, domain: str, targets: dict[str, float],
                  inputs: dict[str, Any], warnings: list[str]) -> tuple[BucketPlan, BucketPlan]:
    """The domain's (short, long) buckets: target tokens, repeat factors, blend weights."""
    budget = float(cfg.train_tokens)
    buckets = []
    for b in BUCKETS:
        avail = inputs["unique"][domain][b]
        target = targets[b]
        if target > 0 and avail <= 0:
            what = "longer than" if b == "long" else "of at most"
            raise PlanError(
                f"{domain}: the budget needs {target:.3g} tokens from documents {what} "
                f"{cfg.long_threshold} tokens, but the dataset has none; change "
                "--domain-weights, --long-threshold or the data"
            )
        repeat = target / avail if avail > 0 else 0.0
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
        ))
    return buckets[0], buckets[1]


def plan_mixture(cfg: MixtureConfig) -> MixturePlan:
    """Compute the plan (pure: reads stats files only, writes nothing)."""
    cfg.validate()
    entries = load_domain_stats(cfg.data_prefixes)
    weights = resolve_weights(cfg, entries)
    warnings: list[str] = []
    inputs = _bucket_inputs(cfg, entries)
    natural = inputs["natural"]
    long_share, shares, details = _domain_long_shares(cfg, weights, natural, warnings)

    budget = float(cfg.train_tokens)
    total_tokens = sum(e["stats"]["tokens"] for e in entries)
    domains = []
    for e in entries:
        d = e["domain"]
        domain_budget = shares[d] * budget
        targets = {"short": domain_budget * (1.0 - long_share[d]),
                   "long": domain_budget * long_share[d]}
        domains.append(DomainPlan(
            domain=d,
            prefix=e["prefix"],
            stats=e["stats_path"],
            documents=e["stats"]["documents"],
            tokens=e["stats"]["tokens"],
            natural_share=e["stats"]["tokens"] / total_tokens if total_tokens else 0.0,
            weight_share=weights[d],
            target_share=shares[d],
            long_share_before=natural[d],
            long_share_after=0.0 if cfg.strategy == "cut" else long_share[d],
            buckets=_bucket_plans(cfg, d, targets, inputs, warnings),
        ))
    return MixturePlan(
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
            unique_tokens=total_tokens,
            long_share_before=sum(x.weight_share * x.long_share_before for x in domains),
            long_share_after=sum(x.target_share * x.long_share_after for x in domains),
            max_repeat=max(b.repeat for x in domains for b in x.buckets),
        ),
        warnings=tuple(warnings),
    )


def _plan_tokenizer(record: dict[str, Any]) -> PlanTokenizer:
    """The stats file's tokenizer record, typed (vocab size, EOD, sha256; the rest kept)."""
    rest = {k: v for k, v in record.items() if k not in ("vocab_size", "eod", "sha256")}
    return PlanTokenizer(vocab_size=int(record["vocab_size"]), eod=int(record["eod"]),
                         sha256=record.get("sha256") or "", details=rest)
