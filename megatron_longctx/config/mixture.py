"""Configuration of stage 2 (stats -> mixture plan, blend files, report)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_longctx.config.flags import Flag, option

STRATEGIES = ("per-source", "global", "original", "cut", "domain-upsample")

#: SlimPajama token shares used by the paper's released code (they sum to 0.9999).
SLIMPAJAMA_SHARES = {
    "RedPajamaCommonCrawl": 0.5337,
    "RedPajamaC4": 0.2661,
    "RedPajamaGithub": 0.0500,
    "RedPajamaBook": 0.0415,
    "RedPajamaArXiv": 0.0429,
    "RedPajamaWikipedia": 0.0340,
    "RedPajamaStackExchange": 0.0317,
}


def parse_upweight(text: str) -> dict[str, float]:
    """`--upweight DOMAIN=FACTOR[,DOMAIN=FACTOR...]` -> {domain: factor}."""
    out: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(
                f"--upweight expects DOMAIN=FACTOR[,DOMAIN=FACTOR...], got {text!r}"
            )
    return out


@dataclass
class MixtureConfig:
    """What `tools/blend_mixture.py` plans; validated before any file is read.

    Each field declares its flag, default and help once (config/flags.py).
    """

    data_prefixes: list[str] = option(flag=Flag(
        "--data-prefix", "dataset prefixes or globs (each with PREFIX.stats.json beside "
        ".bin/.idx)", required=True))
    output_dir: str = option(flag=Flag(
        "--output-dir", "where the plan, blend files, views and report go", required=True))
    strategy: str = option("per-source", Flag("--strategy", "how lengths are mixed",
                                               choices=STRATEGIES))
    domain_weights: str = option("slimpajama", Flag(
        "--domain-weights", "natural | slimpajama | FILE.json ({domain: weight})"))
    long_threshold: int = option(4096, Flag(
        "--long-threshold", "documents longer than this many tokens are long (paper: 4K)"))
    long_fraction: float | None = option(None, Flag(
        "--long-fraction", "target long-token share inside each domain (default 0.7, the "
        "paper's)"))
    short_keep_ratio: float | None = option(None, Flag(
        "--short-keep-ratio", "instead: keep each short document with this probability (the "
        "released code: 0.1)"))
    cut_length: int = option(4096, Flag(
        "--cut-length", "strategy cut: documents cut into pieces of at most this many tokens"))
    upweight: dict[str, float] = option(default_factory=dict, flag=Flag(
        "--upweight", "domain-upsample: DOMAIN=FACTOR,...", parse=parse_upweight))
    train_tokens: float = option(5e9, Flag(
        "--train-tokens", "tokens the training run will see (paper: 5e9)"))
    seq_length: int = option(81920, Flag(
        "--seq-length", "training sequence length (paper: 81920)"))
    max_epochs: float = option(4.0, Flag(
        "--max-epochs", "warn when a bucket repeats more than this many times"))
    valid_fraction: float = option(0.0, Flag(
        "--valid-fraction", "fraction of each domain's documents held out for validation"))
    seed: int = option(1234, Flag(
        "--seed", "seed recorded in the plan for the training-side document selection"))

    def validate(self) -> None:
        """Raise ValueError naming the offending flag."""
        if not self.data_prefixes:
            raise ValueError("--data-prefix: at least one dataset prefix is required")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.long_threshold < 1:
            raise ValueError(f"--long-threshold must be >= 1, got {self.long_threshold}")
        if self.long_fraction is not None and self.short_keep_ratio is not None:
            raise ValueError("give either --long-fraction or --short-keep-ratio, not both")
        if self.long_fraction is not None and not 0.0 < self.long_fraction < 1.0:
            raise ValueError(f"--long-fraction must be in (0, 1), got {self.long_fraction}")
        if self.short_keep_ratio is not None and not 0.0 < self.short_keep_ratio <= 1.0:
            raise ValueError(f"--short-keep-ratio must be in (0, 1], got {self.short_keep_ratio}")
        if (self.long_fraction is not None or self.short_keep_ratio is not None) and (
            self.strategy not in ("per-source", "global")
        ):
            raise ValueError(
                "--long-fraction/--short-keep-ratio only apply to --strategy per-source|global"
            )
        if self.cut_length < 1:
            raise ValueError(f"--cut-length must be >= 1, got {self.cut_length}")
        if self.upweight and self.strategy != "domain-upsample":
            raise ValueError("--upweight only applies to --strategy domain-upsample")
        if self.strategy == "domain-upsample" and not self.upweight:
            raise ValueError("--strategy domain-upsample needs --upweight DOMAIN=FACTOR,...")
        if any(not 0 < v < float("inf") for v in self.upweight.values()):
            raise ValueError(f"--upweight factors must be > 0, got {self.upweight}")
        if not 0 < self.train_tokens < float("inf"):
            raise ValueError(f"--train-tokens must be a finite number > 0, got {self.train_tokens}")
        if self.seq_length < 1:
            raise ValueError(f"--seq-length must be >= 1, got {self.seq_length}")
        if not 0 < self.max_epochs < float("inf"):
            raise ValueError(f"--max-epochs must be a finite number > 0, got {self.max_epochs}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")

    def resolved_long_rule(self) -> tuple[str, float]:
        """('long_fraction', p) or ('short_keep_ratio', k); the paper's 0.7 by default."""
        if self.short_keep_ratio is not None:
            return "short_keep_ratio", self.short_keep_ratio
        return "long_fraction", 0.7 if self.long_fraction is None else self.long_fraction
