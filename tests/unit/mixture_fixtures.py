"""Synthetic SlimPajama-shaped datasets (.bin/.idx + stats) for planner and dataset tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_longctx.atomic import write_json_atomic
from megatron_longctx.config.mixture import SLIMPAJAMA_SHARES
from megatron_longctx.data.indexed import IndexedDatasetWriter
from megatron_longctx.data.stats import STATS_FORMAT, document_stats

# (median tokens, lognormal sigma) per domain, scaled down from the paper's medians.
SHAPES = {
    "RedPajamaCommonCrawl": (1066, 1.1),
    "RedPajamaC4": (315, 0.8),
    "RedPajamaGithub": (520, 1.3),
    "RedPajamaBook": (30000, 0.6),
    "RedPajamaArXiv": (9000, 0.7),
    "RedPajamaWikipedia": (409, 1.0),
    "RedPajamaStackExchange": (507, 0.9),
}
EOD = 0
VOCAB = 1000


def make_lengths(rng: np.random.Generator, domain: str, tokens: int) -> np.ndarray:
    median, sigma = SHAPES[domain]
    out = []
    total = 0
    while total < tokens:
        batch = np.maximum(rng.lognormal(np.log(median), sigma, size=256).astype(np.int64), 2)
        out.append(batch)
        total += int(batch.sum())
    lengths = np.concatenate(out)
    return lengths[: int(np.searchsorted(np.cumsum(lengths), tokens)) + 1]


def write_dataset(prefix: str, lengths: np.ndarray, domain: str, seed: int = 0) -> str:
    """Tokens in [1, VOCAB) with EOD (0) closing each document; stats beside."""
    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(prefix, np.dtype(np.uint16))
    tokens = rng.integers(1, VOCAB, size=int(lengths.sum())).astype(np.int64)
    ends = np.cumsum(lengths) - 1
    tokens[ends] = EOD
    writer.add_documents(tokens, lengths, np.ones(lengths.size, dtype=np.int64))
    stats = {
        "format": STATS_FORMAT,
        "dataset": Path(prefix).name,
        "domain": domain,
        "json_key": "text",
        "level": "document",
        "dtype": "uint16",
        "sequences": int(lengths.size),
        **document_stats(lengths),
        "tokenizer": {"tokenizer_type": "test", "tokenizer_model": "none",
                      "include_special_tokens": False, "vocab_size": VOCAB, "eod": EOD,
                      "sha256": "0" * 64},
    }
    write_json_atomic(prefix + ".stats.json", stats)
    writer.finalize()
    return prefix


def make_slimpajama_like(root: Path, total_tokens: int = 3_000_000, seed: int = 0,
                         domains=None) -> list[str]:
    """One dataset per domain with token counts proportional to the SlimPajama shares."""
    rng = np.random.default_rng(seed)
    prefixes = []
    for i, domain in enumerate(domains or SHAPES):
        tokens = max(int(total_tokens * SLIMPAJAMA_SHARES[domain]), 40_000)
        lengths = make_lengths(rng, domain, tokens)
        prefixes.append(write_dataset(str(root / f"sp_{domain}_text_document"), lengths,
                                      domain, seed=seed + i))
    return prefixes


def hand_made_plan(domains: list[tuple[str, str, int]], valid_fraction: float = 0.0):
    """A valid `MixturePlan` over datasets without stats files: (domain, prefix, documents)
    each, equal shares, every token short (for tests that only need prefixes and the split)."""
    from megatron_longctx.config.mixture import MixtureConfig
    from megatron_longctx.mixture.plan import (
        BucketPlan,
        DomainPlan,
        MixturePlan,
        PlanTokenizer,
        PlanTotals,
    )

    share = 1.0 / len(domains)
    plans = tuple(
        DomainPlan(domain=name, prefix=prefix, stats=prefix + ".stats.json", documents=n,
                   tokens=n, natural_share=share, weight_share=share, target_share=share,
                   long_share_before=0.0, long_share_after=0.0,
                   buckets=(BucketPlan("short", 1, 4096, n, n, share * 1e4, share * 1e4 / n,
                                       share),
                            BucketPlan("long", 4097, None, 0, 0, 0.0, 0.0, 0.0)))
        for name, prefix, n in domains)
    cfg = MixtureConfig(data_prefixes=[p for _, p, _ in domains], output_dir="unused",
                        strategy="original", domain_weights="natural", train_tokens=1e4,
                        seq_length=1024, valid_fraction=valid_fraction)
    return MixturePlan(strategy="original", parameters=cfg, details={}, train_tokens=1e4,
                       seq_length=1024, train_samples=10, long_threshold=4096, cut_length=None,
                       tokenizer=PlanTokenizer(VOCAB, EOD), domains=plans,
                       totals=PlanTotals(sum(n for *_, n in domains), 0.0, 0.0,
                                         max(d.buckets[0].repeat for d in plans)))
