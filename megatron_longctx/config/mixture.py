"""Configuration of stage 2 (stats -> mixture plan, blend files, report)."""

from __future__ import annotations

from dataclasses import dataclass, field

STRATEGIES = ("per-source", "global", "original", "cut", "domain-upsample")

#: SlimPajama token shares used by the paper's released code (FACTS.md; they sum to 0.9999).
SLIMPAJAMA_SHARES = {
    "RedPajamaCommonCrawl": 0.5337,
    "RedPajamaC4": 0.2661,
    "RedPajamaGithub": 0.0500,
    "RedPajamaBook": 0.0415,
    "RedPajamaArXiv": 0.0429,
    "RedPajamaWikipedia": 0.0340,
    "RedPajamaStackExchange": 0.0317,
}


@dataclass
class MixtureConfig:
    """What `tools/blend_mixture.py` plans; validated before any file is read."""

    #: Dataset prefixes (each with `{prefix}.stats.json` beside `.bin/.idx`) (`--data-prefix`).
    data_prefixes: list[str]
    #: Where the plan, blend files, views and report go (`--output-dir`).
    output_dir: str
    #: One of STRATEGIES (`--strategy`).
    strategy: str = "per-source"
    #: `natural`, `slimpajama` or a JSON file {domain: weight} (`--domain-weights`).
    domain_weights: str = "slimpajama"
    #: Documents longer than this many tokens are "long" (`--long-threshold`, paper: 4K).
    long_threshold: int = 4096
    #: Target share of long-document tokens within a domain (`--long-fraction`, paper: 0.7).
    long_fraction: float | None = None
    #: Alternative: keep each short document with this probability (`--short-keep-ratio`;
    #: the released code drops short documents with probability 0.9, i.e. 0.1).
    short_keep_ratio: float | None = None
    #: `cut`: documents are cut into pieces of at most this many tokens (`--cut-length`).
    cut_length: int = 4096
    #: `domain-upsample`: multipliers such as {"RedPajamaBook": 3} (`--upweight`).
    upweight: dict[str, float] = field(default_factory=dict)
    #: Tokens the training run will see (`--train-tokens`, paper: 5e9).
    train_tokens: float = 5e9
    #: Training sequence length (`--seq-length`, paper: 81920).
    seq_length: int = 81920
    #: Warn when a bucket repeats more than this many times (`--max-epochs`).
    max_epochs: float = 4.0
    #: Fraction of each domain's documents held out for validation views (`--valid-fraction`).
    valid_fraction: float = 0.0
    #: Seed recorded in the plan for the training-side document selection (`--seed`).
    seed: int = 1234

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
        if any(v <= 0 for v in self.upweight.values()):
            raise ValueError(f"--upweight factors must be > 0, got {self.upweight}")
        if not self.train_tokens > 0:
            raise ValueError(f"--train-tokens must be > 0, got {self.train_tokens}")
        if self.seq_length < 1:
            raise ValueError(f"--seq-length must be >= 1, got {self.seq_length}")
        if not self.max_epochs > 0:
            raise ValueError(f"--max-epochs must be > 0, got {self.max_epochs}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")

    def resolved_long_rule(self) -> tuple[str, float]:
        """('long_fraction', p) or ('short_keep_ratio', k); the paper's 0.7 by default."""
        if self.short_keep_ratio is not None:
            return "short_keep_ratio", self.short_keep_ratio
        return "long_fraction", 0.7 if self.long_fraction is None else self.long_fraction
