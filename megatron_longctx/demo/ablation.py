"""The paper's data-mixture comparison (Fu et al. 2024, Table 5) as one call, on any data.

From one stage-1 checkpoint and one set of per-domain datasets, each *arm* (a planner strategy
with its parameters, `ARMS`) is planned (mixture/planner.py, one plan directory per arm),
trained for the same number of tokens through the real trainer (pretrain_longctx.py as a
subprocess, the demo's stage-2 command: `pipeline.Stage2Run`), and evaluated. The arms:
`original`; `per-source`, the released code's rule (keep each short document with probability
`--short-keep-ratio`, 0.1; domain shares kept); `per-source-target`, the paper's stated
long-fraction target (`--long-fraction` long tokens inside each domain); `global` (one keep
ratio `--short-keep-ratio` for short documents of every domain, the released code's global
mode); `domain-upsample` of the long-document domains; `cut` at the stage-1 length.

Every arm is repeated for `--seeds` seeds (`--seed`, `--seed`+1, ...): per seed the plan, the
trainer (`--seed`: data order and initialisation of new state), the audit and the evaluation
draws (the needles) use that seed. The stage-1 checkpoint is shared, so the intervals cover
stage-2 data sampling and order and the evaluation draws, not stage-1 training. Per checkpoint:

- **needle** at `--needle-lengths` (default half, three quarters and all of the long length)
  x `--needle-depths` depths (eval/needle.py's `run_needle`: the synthetic-fact needle on the
  demo corpus, the paper's needle and template for other data); the score is the mean over all
  cells, per-length means beside it;
- **loss per domain** on the held-out documents (the last `--valid-fraction` of each domain's
  documents: the plans' validation split, never trained on by any arm), from eval/ppl.py's
  `run_ppl` at the long length with buckets that resolve both lengths: "short" is the mean loss
  at positions 1 .. short-1 (what the stage-1 window sees; with causal attention identical to
  evaluating at the short length), "long" the mean at positions short .. long-1 (only reachable
  with the extended context). Same documents for every checkpoint and seed;
- **realised shares** of what was trained on: the domain shares and the share of tokens from
  long documents, counted by mixture/audit.py's `audit_datasets` over the training index built
  with the trainer's own call (`build_plan_datasets`, its sample count, seed and cache
  directory). `index_from_trainer_cache` records that the audit created no new index file,
  i.e. it read the very index files the trainer built or loaded.

Across seeds (demo/intervals.py) each number is a mean with its 95% Student-t interval; loss
changes against `REFERENCE` are taken inside each seed, then summarised; `per-source` is
compared with every other arm by the paired per-seed difference of the needle score and of
the loss beyond the stage-1 window, with whether the interval excludes 0. With 20 needle
cells and one seed, 10-20 point needle differences were within noise; 3 lengths x the depths
x 3 seeds puts 9x the cells behind each mean.

The evaluations run in this process through the eval library (the same functions the eval
tools call): a checkpoint's 3 tool starts would add ~30 s of Python/torch start-up each on the
2-core machine. Training stays a subprocess of the real trainer.

Outputs under the output directory: `seeds/{seed}/stage1/` (the "before" evaluation with that
seed's needle draws), `seeds/{seed}/strategies/{arm}/` (plan, checkpoint, needle and ppl
results, `result.json`), `plots/*.png`, `results.json` and `report.md`. Resumable:
`result.json` is written atomically last in each directory; a rerun skips the (seed, arm)
pairs that have one and redoes the others from scratch (a killed arm's partial directory is
removed first). A rerun with other settings is refused (`ablation_settings.json`), except
`--seeds`: it is not part of the directory's identity, so a rerun with more seeds extends the
results (the seeds already done are skipped) and one with fewer reports only the first ones.
Deterministic: CPU training, planning and evaluation are seeded, so a rerun gives the same
numbers (tests/unit/test_ablation.py checks it for one arm).
"""

from __future__ import annotations

import glob
import json
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from megatron_longctx.atomic import write_json_atomic, write_text_atomic
from megatron_longctx.config.flags import Flag, flag_of, option
from megatron_longctx.config.mixture import MixtureConfig
from megatron_longctx.config.presets import PRESETS
from megatron_longctx.demo.intervals import (
    fmt_interval,
    fmt_pm,
    mean_interval,
    paired_difference,
    separated,
)
from megatron_longctx.demo.pipeline import (
    DEMO_PPL_DOCS,
    DEMO_VALID_FRACTION,
    MIN_PLAN_TOKENS,
    Stage2Run,
    run_tool,
)
from megatron_longctx.demo.plots import (
    plot_domain_deltas,
    plot_domain_shares,
    plot_position_curves,
    position_bucket_edges,
)
from megatron_longctx.eval.needle import NEEDLE_TYPES

FORMAT = "megatron-longctx-ablation/2"
#: Arm -> the planner strategy it runs (its parameters: `arm_config`). `per-source` is the
#: released code's rule (short documents kept with probability `--short-keep-ratio`),
#: `per-source-target` the paper's stated long-fraction target (`--long-fraction`).
ARMS = {"original": "original", "per-source": "per-source",
        "per-source-target": "per-source", "global": "global",
        "domain-upsample": "domain-upsample", "cut": "cut"}
#: Default order: the reference first, so every later row has its deltas as soon as it is done.
ABLATION_ARMS = tuple(ARMS)
#: Loss changes are measured against this arm (the paper's Table 5 baseline).
REFERENCE = "original"
#: The arm every other one is compared with, pairwise by seed (the released recipe).
PAIRWISE_BASE = "per-source"
SETTINGS_FILE = "ablation_settings.json"
RESULT_FILE = "result.json"
#: Settings a rerun in the same directory may change: more seeds extend the results.
NOT_IDENTITY = ("seeds",)

__all__ = ["ABLATION_ARMS", "ARMS", "AblationPaths", "AblationResult", "AblationSettings",
           "aggregate", "arm_config", "auto_upsample_domains", "demo_ablation_settings",
           "loss_split", "pairwise_lines", "parse_ints", "parse_names", "resolve_prefixes",
           "run_ablation", "run_demo_ablation", "summary_lines", "table_rows"]


def parse_names(text: str) -> tuple[str, ...]:
    """``a,b , c`` -> ('a', 'b', 'c') (empty items dropped)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def parse_ints(text: str) -> tuple[int, ...]:
    """``256, 384,512`` -> (256, 384, 512).

    Raises:
        ValueError: an item is not an integer (names it).
    """
    items = parse_names(text)
    bad = [t for t in items if not t.lstrip("+-").isdigit()]
    if bad:
        raise ValueError(f"integers expected, got {', '.join(map(repr, bad))}")
    return tuple(int(t) for t in items)


@dataclass(frozen=True)
class AblationSettings:
    """Everything the comparison's numbers depend on; tools/ablate_mixture.py's flags.

    The defaults are the demo's (docs/demo.md) except where the data decides: `domain_weights`
    (the planner's default SlimPajama shares), the needle (`paper`, 10 depths, 50 new tokens:
    tools/eval_needle.py's defaults). Validated on construction; ValueError names the flag.
    """

    data_prefix: tuple[str, ...] = option(flag=Flag(
        "--data-prefix",
        "per-domain dataset prefixes or globs, comma-separated (each with PREFIX.stats.json, as "
        "tools/blend_mixture.py takes)", parse=parse_names, one_value=True, metavar="PREFIX,...",
        required=True))
    stage1_checkpoint: str = option(flag=Flag(
        "--stage1-checkpoint", "the checkpoint every strategy continues from", required=True))
    tokenizer_model: str = option(flag=Flag(
        "--tokenizer-model", "tokenizer directory of the datasets and model", required=True))
    model_preset: str = option("demo", Flag(
        "--model-preset", "model shape of the stage-1 checkpoint (config/presets.py)"))
    short_length: int = option(64, Flag(
        "--short-length", "stage-1 sequence length (cut length, 'short' loss positions)"))
    long_length: int = option(512, Flag(
        "--long-length", "stage-2 sequence length; documents longer than this are long"))
    long_rotary_base: int = option(1000000, Flag("--long-rotary-base", "stage-2 RoPE base"))
    stage2_iters: int = option(400, Flag("--stage2-iters", "stage-2 steps per strategy"))
    tokens_per_step: int = option(8192, Flag("--tokens-per-step", "stage-2 tokens per step"))
    strategies: tuple[str, ...] = option(ABLATION_ARMS, Flag(
        "--strategies", "arms to compare, in run order (each a planner strategy with its "
        "parameters)", parse=parse_names, one_value=True, metavar="ARM,...",
        default_help=",".join(ABLATION_ARMS)))
    long_fraction: float = option(0.9, Flag(
        "--long-fraction", "per-source-target: long-token share inside each domain"))
    short_keep_ratio: float = option(0.1, Flag(
        "--short-keep-ratio", "per-source and global: probability of keeping each short "
        "document (the released code's 0.1)"))
    upsample_domains: tuple[str, ...] = option((), Flag(
        "--upsample-domains",
        "domain-upsample's domains (auto: the paper's ArXiv, Book and GitHub when the data has "
        "SlimPajama's domains, else those whose natural share of tokens in long documents "
        "exceeds the corpus's)", parse=parse_names, one_value=True, metavar="DOMAIN,...",
        default_help="auto"))
    upweight_factor: float = option(3.0, Flag(
        "--upweight-factor", "domain-upsample: weight factor of those domains"))
    domain_weights: str = option("slimpajama", Flag(
        "--domain-weights", "target domain shares (natural | slimpajama | FILE.json)"))
    valid_fraction: float = option(0.1, Flag(
        "--valid-fraction",
        "share of each domain's documents held out (the per-domain loss is measured on them)"))
    needle_type: str = option("paper", Flag(
        "--needle-type", "needle (tools/eval_needle.py --needle-type)", choices=NEEDLE_TYPES))
    needle_lengths: tuple[int, ...] = option((), Flag(
        "--needle-lengths", "needle prompt lengths in tokens, each <= --long-length (auto: "
        "half, three quarters and all of --long-length)", parse=parse_ints, one_value=True,
        metavar="L,...", default_help="auto"))
    needle_depths: int = option(10, Flag("--needle-depths", "needle depths per length"))
    needle_new_tokens: int = option(50, Flag(
        "--needle-new-tokens", "greedy tokens generated per needle prompt"))
    ppl_docs_per_domain: int = option(16, Flag(
        "--ppl-docs-per-domain", "held-out documents per domain for the loss"))
    seed: int = option(1234, Flag(
        "--seed", "first seed of the plans, the trainer and the needles"))
    seeds: int = option(3, Flag(
        "--seeds", "seeds per arm: --seed, --seed+1, ... (a rerun with more extends the "
        "results)"))

    def __post_init__(self) -> None:
        by_name = {f.name: f for f in fields(self)}
        for name in ("short_length", "long_rotary_base", "stage2_iters", "tokens_per_step",
                     "needle_depths", "needle_new_tokens", "ppl_docs_per_domain", "seeds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag_of(by_name[name])} must be an integer >= 1, "
                                 f"got {value!r}")
        if not self.data_prefix:
            raise ValueError("--data-prefix: at least one dataset prefix or glob is required")
        if self.short_length < 2 or self.long_length <= self.short_length:
            raise ValueError(f"--long-length must be > --short-length ({self.short_length}) "
                             f">= 2, got {self.long_length}")
        if self.model_preset not in PRESETS:
            raise ValueError(f"--model-preset must be one of {sorted(PRESETS)}, "
                             f"got {self.model_preset!r}")
        unknown = [s for s in self.strategies if s not in ARMS]
        if unknown or not self.strategies or len(set(self.strategies)) < len(self.strategies):
            raise ValueError(f"--strategies: distinct arm names among {ABLATION_ARMS}, "
                             f"got {list(self.strategies)}")
        if not 0.0 < self.short_keep_ratio <= 1.0:
            raise ValueError(f"--short-keep-ratio must be in (0, 1], got {self.short_keep_ratio}")
        bad = [x for x in self.needle_lengths
               if isinstance(x, bool) or not isinstance(x, int) or not 0 < x <= self.long_length]
        if bad or len(set(self.needle_lengths)) < len(self.needle_lengths):
            raise ValueError(f"--needle-lengths: distinct token counts in 1..--long-length "
                             f"({self.long_length}), got {list(self.needle_lengths)}")
        for name in ("long_fraction", "valid_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{flag_of(by_name[name])} must be in (0, 1), "
                                 f"got {getattr(self, name)}")
        if not self.upweight_factor > 0:
            raise ValueError(f"--upweight-factor must be > 0, got {self.upweight_factor}")

    @property
    def global_batch(self) -> int:
        """Samples per step (`pipeline.batch_flags`)."""
        return max(self.tokens_per_step // self.long_length, 1)

    @property
    def train_samples(self) -> int:
        """Samples each arm's stage 2 trains on (equal for all)."""
        return self.stage2_iters * self.global_batch

    @property
    def needle_length_grid(self) -> list[int]:
        """`needle_lengths`, or half, three quarters and all of the long length (rounded):
        256, 384, 512 at 512."""
        if self.needle_lengths:
            return sorted(self.needle_lengths)
        return sorted({round(self.long_length * f) for f in (0.5, 0.75, 1.0)})

    @property
    def seed_list(self) -> list[int]:
        """`seed`, `seed`+1, ..., `seed`+`seeds`-1."""
        return [self.seed + k for k in range(self.seeds)]


@dataclass(frozen=True)
class AblationPaths:
    """Where the comparison writes, under one output directory."""

    root: Path

    @property
    def settings(self) -> Path:
        return self.root / SETTINGS_FILE

    def seed(self, seed: int) -> Path:
        return self.root / "seeds" / str(seed)

    def stage1(self, seed: int) -> Path:
        """The stage-1 checkpoint's evaluation with `seed`'s draws (the "before" row)."""
        return self.seed(seed) / "stage1"

    def arm(self, seed: int, name: str) -> Path:
        return self.seed(seed) / "strategies" / name

    @property
    def plots(self) -> Path:
        return self.root / "plots"


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def resolve_prefixes(patterns: tuple[str, ...]) -> list[str]:
    """Dataset prefixes from prefixes or globs (a match is a prefix with a stats file).

    Raises:
        FileNotFoundError: a pattern matches no dataset (names --data-prefix).
    """
    prefixes: list[str] = []
    for pattern in patterns:
        found = sorted(p.removesuffix(".stats.json")
                       for p in glob.glob(pattern.removesuffix(".stats.json") + ".stats.json"))
        if not found:
            raise FileNotFoundError(f"--data-prefix {pattern}: no dataset with a stats file "
                                    f"({pattern}.stats.json)")
        prefixes += [p for p in found if p not in prefixes]
    return prefixes


def check_inputs(settings: AblationSettings) -> list[str]:
    """The dataset prefixes, after checking every input exists (errors name the flag)."""
    from megatron_longctx.checkpoint.meta import resolve_checkpoint

    prefixes = resolve_prefixes(settings.data_prefix)
    try:
        found = resolve_checkpoint(settings.stage1_checkpoint)
    except (ValueError, OSError) as err:  # an invalid or incomplete checkpoint
        raise FileNotFoundError(f"--stage1-checkpoint: {err}") from None
    if found is None:
        raise FileNotFoundError(f"--stage1-checkpoint {settings.stage1_checkpoint}: no "
                                "complete checkpoint there")
    if not Path(settings.tokenizer_model).is_dir():
        raise FileNotFoundError(f"--tokenizer-model {settings.tokenizer_model}: no such "
                                "directory")
    return prefixes


#: The paper's "Upsample Arxiv/Book/Github" arm (Fu et al. 2024, Table 5), by SlimPajama name.
PAPER_UPSAMPLE_DOMAINS = ("RedPajamaArXiv", "RedPajamaBook", "RedPajamaGithub")


def auto_upsample_domains(prefixes: list[str], long_threshold: int) -> list[str]:
    """domain-upsample's domains: the paper's (`PAPER_UPSAMPLE_DOMAINS`) when the data has all
    three, else the long-document domains: those whose natural share of tokens in documents
    longer than `long_threshold` exceeds the corpus's (token-weighted over all domains).

    The paper's set is taken by name because the share rule depends on the corpus: on the demo
    corpus at 512 tokens (corpus 31%) it picks CommonCrawl (36%) with Book and ArXiv, and
    GitHub (32%) only by a hair.
    """
    from megatron_longctx.data.stats import tokens_longer_than
    from megatron_longctx.mixture.planner import load_domain_stats

    entries = load_domain_stats(prefixes)
    names = [e["domain"] for e in entries]
    if all(d in names for d in PAPER_UPSAMPLE_DOMAINS):
        return list(PAPER_UPSAMPLE_DOMAINS)
    long = {e["domain"]: tokens_longer_than(e["stats"], long_threshold) for e in entries}
    total = {e["domain"]: float(e["stats"]["tokens"]) for e in entries}
    corpus = sum(long.values()) / max(sum(total.values()), 1.0)
    return [d for d in long if total[d] and long[d] / total[d] > corpus]


def input_identity(settings: AblationSettings, prefixes: list[str]) -> dict[str, Any]:
    """What the results were made from, by content (`identity.content_sha256`): the stage-1
    checkpoint iteration read (retrained in place: another hash) and every dataset the
    prefixes and globs resolved to (a new one matching a glob: another key), each its
    .idx and .bin."""
    from megatron_longctx.checkpoint.meta import resolve_checkpoint
    from megatron_longctx.identity import content_sha256

    stage1 = resolve_checkpoint(settings.stage1_checkpoint)
    return {"stage1_checkpoint_sha256": content_sha256(stage1) if stage1 else None,
            "datasets": {p: [content_sha256(f"{p}.idx"), content_sha256(f"{p}.bin")]
                         for p in prefixes}}


def claim_output_dir(settings: AblationSettings, paths: AblationPaths,
                     inputs: dict[str, Any] | None = None) -> None:
    """Record the settings (all but `NOT_IDENTITY`: `seeds`) and the inputs' identity
    (`input_identity`) beside the results; refuse a directory made with other ones.

    Raises:
        ValueError: `paths.settings` exists with other settings or inputs (names the fields).
    """
    identity = {k: v for k, v in asdict(settings).items() if k not in NOT_IDENTITY}
    wanted = json.loads(json.dumps({**identity, **(inputs or {})}))
    if paths.settings.is_file():
        held = json.loads(paths.settings.read_text())
        changed = sorted(k for k in set(wanted) | set(held) if wanted.get(k) != held.get(k))
        if changed:
            raise ValueError(f"--output-dir {paths.root} holds results of other settings "
                             f"({', '.join(changed)}); use another --output-dir or remove it")
        return
    paths.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(paths.settings, wanted)


# --------------------------------------------------------------------------------------------
# one arm and seed: plan, train, audit, evaluate
# --------------------------------------------------------------------------------------------
def arm_parameters(settings: AblationSettings, arm: str,
                   upsample: list[str]) -> dict[str, Any]:
    """The planner parameters `arm` sets beyond the shared ones (MixtureConfig fields)."""
    if arm in ("per-source", "global"):
        return {"short_keep_ratio": settings.short_keep_ratio}
    if arm == "per-source-target":
        return {"long_fraction": settings.long_fraction}
    if arm == "cut":
        return {"cut_length": settings.short_length}
    if arm == "domain-upsample":
        return {"upweight": {d: settings.upweight_factor for d in upsample}}
    return {}


def arm_config(settings: AblationSettings, arm: str, prefixes: list[str],
               output_dir: Path, upsample: list[str]) -> MixtureConfig:
    """The planner's config for `arm` (`ARMS`: its strategy, `arm_parameters`: the keep ratio
    for per-source and global, the long fraction for per-source-target, `cut` at the stage-1
    length, `upsample` x `upweight_factor` for domain-upsample), the stage-2 length and budget,
    "long" = longer than the stage-2 length, `settings.seed` as the plan's seed.

    The plan's budget is the trained tokens, floored at `MIN_PLAN_TOKENS` like the demo's (a
    smaller plan subsamples small domains to nothing); shares do not depend on it.
    """
    return MixtureConfig(
        data_prefixes=list(prefixes), output_dir=str(output_dir), strategy=ARMS[arm],
        domain_weights=settings.domain_weights, long_threshold=settings.long_length,
        train_tokens=float(max(settings.train_samples * settings.long_length,
                               MIN_PLAN_TOKENS)),
        seq_length=settings.long_length, valid_fraction=settings.valid_fraction,
        seed=settings.seed, **arm_parameters(settings, arm, upsample))


def realized_shares(settings: AblationSettings, mixture_dir: Path) -> dict[str, Any]:
    """Domain and long-document shares of the samples the trainer drew from its index.

    The index is rebuilt with the trainer's call (`build_plan_datasets`: its sample count,
    seed, sequence length and cache directory), which loads the trainer's cached index files;
    `index_from_trainer_cache` is False if the build had to write any new file. The trainer
    reads the blended index in order (training/data.py `BatchSampler`, Megatron's sampler), so
    what it trained on is the index's first `train_samples` entries: the audit counts those
    (megatron may build a few samples more: `index_samples`).
    """
    from types import SimpleNamespace

    from megatron_longctx.mixture.audit import audit_datasets, ensure_process_group
    from megatron_longctx.mixture.dataset import DatasetTokenizer, build_plan_datasets
    from megatron_longctx.mixture.plan import load_plan

    plan = load_plan(str(mixture_dir / "mixture_plan.json"))
    cache = mixture_dir / "cache"
    before = {p for p in cache.rglob("*") if p.is_file()}
    ensure_process_group()
    tok = plan.tokenizer
    n = settings.train_samples
    train, _, _ = build_plan_datasets(
        plan, DatasetTokenizer(tok.vocab_size, tok.eod, tok.sha256), (n, 0, 0),
        seed=settings.seed, cache_dir=str(cache), seq_length=settings.long_length)
    after = {p for p in cache.rglob("*") if p.is_file()}
    if len(train.dataset_index) < n:
        raise ValueError(f"{mixture_dir}: the training index has {len(train.dataset_index)} "
                         f"samples, fewer than the {n} trained")
    trained = SimpleNamespace(datasets=train.datasets, dataset_index=train.dataset_index[:n],
                              dataset_sample_index=train.dataset_sample_index[:n])
    audit = audit_datasets(plan, trained)
    rows = audit["rows"]
    return {
        "samples": audit["samples"], "index_samples": len(train.dataset_index),
        "tokens": audit["samples"] * settings.long_length,
        "domain_shares": {r["domain"]: r["realized"] for r in rows if r["bucket"] == "all"},
        "long_share": sum(r["realized"] for r in rows if r["bucket"] == "long"),
        "planned_domain_shares": {d.domain: d.target_share for d in plan.domains},
        "planned_long_share": plan.totals.long_share_after,
        "target_domain_weights": {d.domain: d.weight_share for d in plan.domains},
        "max_abs_diff_vs_plan": audit["max_abs_diff"],
        "max_document_repeats": max(audit["max_document_repeats"].values(), default=0.0),
        "max_document_repeats_by_domain": audit["max_document_repeats"],
        "index_from_trainer_cache": not (after - before),
    }


def loss_split(buckets: list[dict[str, Any]], short_length: int) -> dict[str, float | None]:
    """Token-weighted mean loss inside the short window (bucket ends <= `short_length`) and
    beyond it (bucket starts >= `short_length`), from eval/ppl.py bucket rows."""
    def mean(rows: list[dict[str, Any]]) -> float | None:
        n = sum(b["tokens"] for b in rows if b["loss"] is not None)
        return (sum(b["loss"] * b["tokens"] for b in rows if b["loss"] is not None) / n
                if n else None)

    return {"short": mean([b for b in buckets if b["end"] <= short_length]),
            "long": mean([b for b in buckets if b["start"] >= short_length])}


class _LossCache:
    """A model's token losses, computed once per distinct token sequence (eval/ppl.py needs
    `vocab_size`, `describe()` and `token_losses(ids)`)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.vocab_size = model.vocab_size
        self._losses: dict[tuple[int, ...], Any] = {}

    def describe(self) -> Any:
        return self.model.describe()

    def token_losses(self, ids: list[int]) -> Any:
        key = tuple(ids)
        if key not in self._losses:
            self._losses[key] = self.model.token_losses(ids)
        return self._losses[key]


def evaluate_checkpoint(settings: AblationSettings, checkpoint: Path, eval_dir: Path,
                        sources: list[Any], training_length: int) -> dict[str, Any]:
    """Needle at `needle_length_grid` x the depths (draws from `settings.seed`) and loss by
    position and domain on the held-out documents, in this process (eval/needle.py
    `run_needle`, eval/ppl.py `run_ppl`)."""
    from megatron_longctx.eval.models import load_causal_lm
    from megatron_longctx.eval.needle import NeedleSettings, depth_grid, run_needle
    from megatron_longctx.eval.ppl import run_ppl

    edges = position_bucket_edges(settings.short_length, settings.long_length)
    model = load_causal_lm(checkpoint, tokenizer_model=settings.tokenizer_model)
    scorer = _LossCache(model)  # the full-length curve reuses documents the first pass scored
    try:
        needle = run_needle(model, NeedleSettings(
            lengths=settings.needle_length_grid, depths=depth_grid(settings.needle_depths),
            needle_type=settings.needle_type, max_new_tokens=settings.needle_new_tokens,
            seed=settings.seed, training_length=training_length),
            eval_dir / "needle", overwrite=True, log=None)
        ppl = run_ppl(scorer, sources, eval_dir / "ppl", seq_length=settings.long_length,
                      edges=edges, min_length=settings.short_length,
                      max_docs_per_domain=settings.ppl_docs_per_domain, log=None)
        try:  # the position curve: only documents that fill every bucket
            whole = run_ppl(scorer, sources, eval_dir / "ppl_long_documents",
                            seq_length=settings.long_length, edges=edges,
                            min_length=settings.long_length,
                            max_docs_per_domain=settings.ppl_docs_per_domain, log=None)
        except ValueError:  # no held-out document reaches the long length
            whole = None
    finally:
        model.close()
    by_length: dict[str, list[float]] = {}
    for cell in needle["cells"]:
        by_length.setdefault(str(int(cell["length"])), []).append(cell["score"])
    return {
        "needle": needle["overall"],
        "needle_by_length": {n: sum(v) / len(v) for n, v in by_length.items()},
        "needle_cells": "".join("x" if c["score"] >= 50 else "." for c in needle["cells"]),
        "loss": {"all": loss_split(ppl["buckets"], settings.short_length),
                 **{d: loss_split(v["buckets"], settings.short_length)
                    for d, v in sorted(ppl["domains"].items())}},
        "documents": {d: v["documents"] for d, v in sorted(ppl["domains"].items())},
        "buckets": ppl["buckets"],
        # Loss by position on documents of at least the long length only: every bucket sees
        # the same documents, so the curve shows what more context is worth, not which
        # domains have long documents (the buckets above mix shorter documents in early).
        "long_document_buckets": whole["buckets"] if whole else None,
        "long_documents": ({d: v["documents"] for d, v in sorted(whole["domains"].items())}
                           if whole else {}),
    }


def run_arm(settings: AblationSettings, paths: AblationPaths, arm: str, prefixes: list[str],
            upsample: list[str], sources: list[Any]) -> dict:
    """Plan, train, audit and evaluate one arm with `settings.seed` (plan, trainer `--seed`,
    audit and needle draws) into a fresh directory; `result.json` (written atomically, last)
    marks it done."""
    from megatron_longctx.mixture.outputs import write_plan_outputs
    from megatron_longctx.mixture.planner import plan_mixture

    start = time.time()
    root = paths.arm(settings.seed, arm)
    if root.exists():
        shutil.rmtree(root)  # a killed attempt: start this arm over
    cfg = arm_config(settings, arm, prefixes, root / "mixture", upsample)
    plan = plan_mixture(cfg)
    write_plan_outputs(plan, cfg.output_dir)
    for warning in plan.warnings:
        print(f"   plan warning: {warning}", flush=True)
    run = Stage2Run(settings.model_preset, Path(settings.tokenizer_model), root / "mixture",
                    settings.long_length, settings.long_rotary_base, settings.stage2_iters,
                    settings.tokens_per_step, Path(settings.stage1_checkpoint),
                    root / "checkpoint", root / "tensorboard",
                    extra=("--seed", str(settings.seed)))
    run_tool(f"stage 2 ({arm}, seed {settings.seed}): {settings.stage2_iters} steps x "
             f"{settings.global_batch * settings.long_length} tokens at {settings.long_length}",
             run.train_args())
    realized = realized_shares(settings, root / "mixture")
    print(f"   realised: long-document tokens {realized['long_share']:.1%}, domains "
          + ", ".join(f"{d.removeprefix('RedPajama')} {s:.1%}"
                      for d, s in realized["domain_shares"].items()), flush=True)
    evaluation = evaluate_checkpoint(settings, root / "checkpoint", root / "eval", sources,
                                     settings.long_length)
    result = {"arm": arm, "strategy": ARMS[arm], "seed": settings.seed,
              "plan": {"details": plan.details, "warnings": list(plan.warnings),
                       "train_tokens": plan.train_tokens,
                       "parameters": arm_parameters(settings, arm, upsample)},
              "realized": realized, **evaluation, "seconds": round(time.time() - start, 1)}
    write_json_atomic(root / RESULT_FILE, result)
    return result


def _load_done(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


# --------------------------------------------------------------------------------------------
# the comparison
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AblationResult:
    """What `run_ablation` produced: results.json's contents and report.md's lines."""

    paths: AblationPaths
    results: dict[str, Any]
    lines: list[str]
    summary: list[str]


def _progress(label: str, k: int, total: int, start: float, durations: list[float]) -> None:
    """`==== [ablation k/total] seed S, arm (elapsed, ETA from this run's mean arm time)`."""
    eta = (f", ~{(total - k) * sum(durations) / len(durations) / 60:.0f} min left"
           if durations else "")
    print(f"\n==== [ablation {k + 1}/{total}] {label} (elapsed "
          f"{(time.time() - start) / 60:.1f} min{eta})", flush=True)


def run_ablation(settings: AblationSettings, output_dir: str | Path) -> AblationResult:
    """Per seed: evaluate the stage-1 checkpoint with that seed's draws, run every arm not
    done yet; then aggregate over the seeds and write the report.

    Raises:
        FileNotFoundError: an input is missing (names the flag).
        ValueError: the output directory holds other settings' results; bad data for a plan.
        subprocess.CalledProcessError: the trainer failed (its output is above).
    """
    from megatron_longctx.eval.ppl import sources_from_data_paths
    from megatron_longctx.mixture.planner import PlanError

    paths = AblationPaths(Path(output_dir).resolve())
    prefixes = check_inputs(settings)
    claim_output_dir(settings, paths, input_identity(settings, prefixes))
    upsample = list(settings.upsample_domains) or auto_upsample_domains(
        prefixes, settings.long_length)
    sources = sources_from_data_paths(prefixes, settings.valid_fraction)
    start, durations = time.time(), []
    arms, seeds = settings.strategies, settings.seed_list
    total = len(arms) * len(seeds)
    todo = sum(not (paths.arm(s, a) / RESULT_FILE).is_file() for s in seeds for a in arms)
    runs: dict[str, dict[str, Any]] = {}
    k = 0
    for n, seed in enumerate(seeds):
        at_seed = replace(settings, seed=seed)
        where = f"seed {seed} ({n + 1}/{len(seeds)})"
        stage1 = _load_done(paths.stage1(seed) / RESULT_FILE)
        if stage1 is None:
            print(f"\n==== [ablation] {where}: stage-1 checkpoint (before stage 2)", flush=True)
            stage1 = evaluate_checkpoint(at_seed, Path(settings.stage1_checkpoint),
                                         paths.stage1(seed) / "eval", sources,
                                         settings.short_length)
            write_json_atomic(paths.stage1(seed) / RESULT_FILE, stage1)
        done: dict[str, dict[str, Any]] = {}
        for j, arm in enumerate(arms):
            label = f"{where}, arm {j + 1}/{len(arms)}: {arm}"
            done[arm] = _load_done(paths.arm(seed, arm) / RESULT_FILE)
            if done[arm] is not None:
                print(f"[ablation] {label}: done before (needle {done[arm]['needle']:.1f}), "
                      "skipped", flush=True)
                continue
            _progress(label, k, todo, start, durations)
            k += 1
            try:
                done[arm] = run_arm(at_seed, paths, arm, prefixes, upsample, sources)
            except PlanError as err:
                raise ValueError(f"{arm} plan: {err}") from None
            durations.append(done[arm]["seconds"])
        runs[str(seed)] = {"stage1": stage1, "strategies": done, "table": table_rows(done)}
    print(f"\n[ablation] {total} runs ({len(arms)} arms x {len(seeds)} seeds), {k} this time, "
          f"{(time.time() - start) / 60:.1f} min", flush=True)
    results = build_results(settings, upsample, runs)
    lines = report_lines(settings, results)
    write_plots(settings, paths, results)
    write_json_atomic(paths.root / "results.json", results)
    write_text_atomic(paths.root / "report.md", "\n".join(lines) + "\n")
    return AblationResult(paths, results, lines, summary_lines(settings, results))


# --------------------------------------------------------------------------------------------
# one seed's table
# --------------------------------------------------------------------------------------------
def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def table_rows(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One seed's row per arm: needle, realised long share, domain drift (total variation
    between the realised domain shares and the reference mixture's target domain shares, and
    the largest single shift) and the loss change per domain against `REFERENCE` (None
    without it).

    The drift is measured against `REFERENCE`'s targets (the `--domain-weights` shares), not
    each plan's own: domain-upsample's own targets already include its upweighting. Without
    the reference, each plan's own targets are used."""
    reference = results.get(REFERENCE)
    rows = {}
    for name, r in results.items():
        real = r["realized"]
        base = (reference or r)["realized"]["target_domain_weights"]
        shift = {d: s - base[d] for d, s in real["domain_shares"].items()}
        biggest = max(shift, key=lambda d: abs(shift[d]))
        deltas = {part: {d: (_delta(v[part], reference["loss"].get(d, {}).get(part))
                             if reference else None)
                         for d, v in r["loss"].items()} for part in ("short", "long")}
        rows[name] = {"needle": r["needle"], "needle_by_length": r.get("needle_by_length", {}),
                      "long_share": real["long_share"],
                      "max_document_repeats": real.get("max_document_repeats"),
                      "domain_drift": 0.5 * sum(abs(v) for v in shift.values()),
                      "largest_shift": {"domain": biggest, "change": shift[biggest]},
                      "delta_short": deltas["short"], "delta_long": deltas["long"]}
    return rows


# --------------------------------------------------------------------------------------------
# across seeds
# --------------------------------------------------------------------------------------------
def _domains(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Every loss domain of any run, sorted, then "all"."""
    found = {d for run in runs.values() for r in run["strategies"].values() for d in r["loss"]}
    return [*sorted(found - {"all"}), "all"]


def aggregate(runs: dict[str, dict[str, Any]], arms: tuple[str, ...] | list[str]
              ) -> dict[str, Any]:
    """Mean and 95% interval over the seeds (`runs`: seed -> {"stage1", "strategies",
    "table"}) of each arm's needle (overall and per length), realised long share, domain
    drift and loss changes against `REFERENCE` (paired by seed: each seed's delta, then
    summarised); the most repeated document is the max over seeds. Also the stage-1 row, the
    reference's absolute losses and `PAIRWISE_BASE` minus every other arm (needle, loss at
    long positions over all domains) per seed with its interval and `separated`.
    """
    seeds = list(runs)
    domains = _domains(runs)
    rows = {s: runs[s]["table"] for s in seeds}

    def over(arm: str, get: Any) -> dict[str, Any]:
        return mean_interval(get(rows[s][arm]) for s in seeds if arm in rows[s])

    summary: dict[str, Any] = {}
    for arm in arms:
        lengths = sorted({int(n) for s in seeds if arm in rows[s]
                          for n in rows[s][arm]["needle_by_length"]})
        repeats = [rows[s][arm]["max_document_repeats"] for s in seeds if arm in rows[s]]
        summary[arm] = {
            "needle": over(arm, lambda r: r["needle"]),
            "needle_by_length": {str(n): over(arm, lambda r, n=n: r["needle_by_length"]
                                              .get(str(n))) for n in lengths},
            "long_share": over(arm, lambda r: r["long_share"]),
            "domain_drift": over(arm, lambda r: r["domain_drift"]),
            "max_document_repeats": max((x for x in repeats if x is not None), default=None),
            **{f"delta_{part}": {d: over(arm, lambda r, p=part, d=d: r[f"delta_{p}"].get(d))
                                 for d in domains} for part in ("short", "long")},
        }
    stage1 = {"needle": mean_interval(runs[s]["stage1"]["needle"] for s in seeds),
              **{f"loss_{part}": mean_interval(runs[s]["stage1"]["loss"]["all"][part]
                                               for s in seeds) for part in ("short", "long")}}
    reference = {part: {d: mean_interval(runs[s]["strategies"][REFERENCE]["loss"]
                                         .get(d, {}).get(part) for s in seeds
                                         if REFERENCE in runs[s]["strategies"])
                        for d in domains} for part in ("short", "long")}

    def per_seed(arm: str, get: Any) -> dict[str, float | None]:
        return {s: get(runs[s]["strategies"][arm]) for s in seeds
                if arm in runs[s]["strategies"]}

    pairwise: dict[str, Any] = {}
    if PAIRWISE_BASE in arms:
        for arm in arms:
            if arm == PAIRWISE_BASE:
                continue
            pair = {}
            for key, get in (("needle", lambda r: r["needle"]),
                             ("loss_long_all", lambda r: r["loss"]["all"]["long"])):
                diff = paired_difference(per_seed(PAIRWISE_BASE, get), per_seed(arm, get))
                pair[key] = {**diff, "separated": separated(diff)}
            pairwise[arm] = pair
    return {"arms": summary, "stage1": stage1, "reference_loss": reference,
            "pairwise": pairwise}


def build_results(settings: AblationSettings, upsample: list[str],
                  runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """results.json: the arms, the aggregate over seeds and every seed's results.

    Keys: `format`, `reference` ("original"), `pairwise_base` ("per-source"),
    `upsample_domains`, `arms` ({arm: {"strategy", "parameters"}}), `seed_list`,
    `needle_lengths`, `stage2_tokens_per_strategy`, `summary` (`aggregate`: "arms" -> arm ->
    "needle", "needle_by_length" {length: stat}, "long_share", "domain_drift",
    "max_document_repeats" (max over seeds), "delta_short"/"delta_long" {domain or "all":
    stat}; "stage1" -> "needle", "loss_short", "loss_long"; "reference_loss" -> "short"/"long"
    -> domain -> stat; "pairwise" -> arm -> "needle"/"loss_long_all" -> stat + "seeds" +
    "separated"; a stat is `intervals.mean_interval`'s {"n", "mean", "half_width", "low",
    "high", "values"}), `seeds` ({seed: {"stage1", "strategies": {arm: result.json},
    "table": `table_rows`}}), `seconds`, `settings`.
    """
    return {"format": FORMAT, "reference": REFERENCE, "pairwise_base": PAIRWISE_BASE,
            "upsample_domains": upsample,
            "arms": {a: {"strategy": ARMS[a], "parameters": arm_parameters(settings, a, upsample)}
                     for a in settings.strategies},
            "seed_list": [int(s) for s in runs],
            "needle_lengths": settings.needle_length_grid,
            "stage2_tokens_per_strategy": settings.train_samples * settings.long_length,
            "summary": aggregate(runs, settings.strategies), "seeds": runs,
            "seconds": round(sum(r["seconds"] for run in runs.values()
                                 for r in run["strategies"].values()), 1),
            "settings": asdict(settings)}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def summary_lines(settings: AblationSettings, results: dict[str, Any]) -> list[str]:
    """The main table (the paper's Table 5 in short: mean [95% interval] over the seeds),
    then `pairwise_lines`."""
    s, summary = settings, results["summary"]
    ref = summary["reference_loss"]
    n = len(results["seed_list"])
    lengths = ",".join(map(str, results["needle_lengths"]))
    lines = [f"| arm | needle at {lengths}, mean [95% CI] | long-doc tokens | most repeated "
             f"doc (max over seeds) | domain drift (TV) | Δ loss pos < {s.short_length} [CI] "
             f"| Δ loss pos {s.short_length}-{s.long_length} [CI] |",
             "|---|---|---|---|---|---|---|",
             f"| (stage 1, before) | {fmt_interval(summary['stage1']['needle'], '.1f')} | - | - "
             f"| - | {fmt_interval(summary['stage1']['loss_short'], '.3f')} (abs) | "
             f"{fmt_interval(summary['stage1']['loss_long'], '.3f')} (abs) |"]
    for name, row in summary["arms"].items():
        if name == REFERENCE:
            short = f"{fmt_interval(ref['short']['all'], '.3f')} (abs)"
            long = f"{fmt_interval(ref['long']['all'], '.3f')} (abs)"
        else:
            short = fmt_interval(row["delta_short"]["all"], "+.3f")
            long = fmt_interval(row["delta_long"]["all"], "+.3f")
        lines.append(f"| {name} | {fmt_interval(row['needle'], '.1f')} | "
                     f"{fmt_interval(row['long_share'], '.1%')} | "
                     f"{_num(row['max_document_repeats'], '.1f')}x | "
                     f"{_num(row['domain_drift']['mean'], '.1%')} | {short} | {long} |")
    lines += ["", f"{n} seed{'s' if n != 1 else ''} ({', '.join(map(str, results['seed_list']))})"
              f"; intervals: Student t, 95%, two-sided, df = seeds - 1; they cover stage-2 "
              "data sampling and order and the needle draws, not stage-1 training (one "
              "shared checkpoint)."]
    pair = pairwise_lines(settings, results)
    return [*lines, *([""] + pair if pair else [])]


def pairwise_lines(settings: AblationSettings, results: dict[str, Any]) -> list[str]:
    """``per-source vs global: needle +x.x [a, b] -> separated by 3 seeds; Δ loss pos S-L
    (all) -0.012 [c, d] -> not separated by 3 seeds`` for every other arm."""
    s, pairwise = settings, results["summary"]["pairwise"]
    base = results.get("pairwise_base", PAIRWISE_BASE)
    lines = []
    for arm, pair in pairwise.items():
        parts = []
        for key, label, fmt in (("needle", "needle", "+.1f"),
                                ("loss_long_all", f"Δ loss pos {s.short_length}-"
                                 f"{s.long_length} (all)", "+.3f")):
            stat = pair[key]
            verdict = ({True: "separated", False: "not separated"}.get(stat["separated"])
                       or "no interval")
            parts.append(f"{label} {fmt_interval(stat, fmt)} -> {verdict} by {stat['n']} "
                         f"seed{'s' if stat['n'] != 1 else ''}")
        lines.append(f"- {base} vs {arm}: " + "; ".join(parts))
    if lines:
        lines.insert(0, f"Paired by seed, {base} minus each arm (an interval that excludes 0 "
                     "separates them):")
    return lines


def _domain_table(results: dict[str, Any], part: str, title: str) -> list[str]:
    summary = results["summary"]
    domains = [d for d in _domains(results["seeds"]) if d != "all"]
    head = [d.removeprefix("RedPajama") for d in domains]
    lines = [title, "", f"| arm | {' | '.join(head)} | all |",
             "|---|" + "---|" * (len(domains) + 1)]
    if REFERENCE in summary["arms"]:
        ref = summary["reference_loss"][part]
        lines.append(f"| {REFERENCE} (abs) | " + " | ".join(
            fmt_pm(ref.get(d, {}), ".3f") for d in [*domains, "all"]) + " |")
    for name, row in summary["arms"].items():
        if name != REFERENCE:
            cells = [fmt_pm(row[f"delta_{part}"].get(d, {}), "+.3f") for d in [*domains, "all"]]
            lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


def _mean_shares(results: dict[str, Any]) -> tuple[list[str], dict[str, dict[str, float]],
                                                   dict[str, float]]:
    """The domains, each arm's realised domain shares and long share, means over the seeds."""
    runs = results["seeds"]
    arms = list(results["summary"]["arms"])
    domains = list(next(iter(next(iter(runs.values()))["strategies"].values()))
                   ["realized"]["domain_shares"])
    shares, long = {}, {}
    for arm in arms:
        real = [run["strategies"][arm]["realized"] for run in runs.values()
                if arm in run["strategies"]]
        shares[arm] = {d: sum(r["domain_shares"].get(d, 0.0) for r in real) / len(real)
                       for d in domains}
        long[arm] = sum(r["long_share"] for r in real) / len(real)
    return domains, shares, long


def _parameter_text(key: str, value: Any) -> str:
    """``short_keep_ratio 0.1``; an upweight map as ``upweight Book x3, ArXiv x3``."""
    if isinstance(value, dict):
        return f"{key} " + ", ".join(f"{d.removeprefix('RedPajama')} x{f:g}"
                                     for d, f in value.items())
    return f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"


def report_lines(settings: AblationSettings, results: dict[str, Any]) -> list[str]:
    """report.md: what ran, the main table, the pairwise comparisons, needle by length,
    per-domain loss changes, realised shares."""
    s, summary = settings, results["summary"]
    domains, shares, long = _mean_shares(results)
    share_lines = ["| arm | " + " | ".join(d.removeprefix("RedPajama") for d in domains)
                   + " | long-doc tokens |", "|---|" + "---|" * (len(domains) + 1)]
    share_lines += [f"| {n} | " + " | ".join(f"{shares[n][d]:.1%}" for d in domains)
                    + f" | {long[n]:.1%} |" for n in shares]
    lengths = results["needle_lengths"]
    needle_lines = ["| arm | " + " | ".join(str(L) for L in lengths) + " | all |",
                    "|---|" + "---|" * (len(lengths) + 1)]
    needle_lines += [f"| {n} | " + " | ".join(fmt_pm(row["needle_by_length"].get(str(L), {}),
                                                    ".1f") for L in lengths)
                     + f" | {fmt_pm(row['needle'], '.1f')} |"
                     for n, row in summary["arms"].items()]
    first = next(iter(results["seeds"].values()))
    docs = first["stage1"]["documents"]
    arms = "; ".join(f"{arm}: {spec['strategy']}" + "".join(
        f", {_parameter_text(key, value)}" for key, value in spec["parameters"].items())
        for arm, spec in results["arms"].items())
    return [
        "# Stage-2 data-mixture ablation", "",
        f"Every arm continues {s.stage1_checkpoint} at {s.long_length} tokens (RoPE base "
        f"{s.long_rotary_base}) for {s.stage2_iters} steps x {s.global_batch} samples = "
        f"{results['stage2_tokens_per_strategy']:,} tokens, once per seed "
        f"({', '.join(map(str, results['seed_list']))}: plan, trainer, audit and needle draws; "
        f"stage 1 is shared). Long documents: > {s.long_length} tokens. Arms (planner "
        f"strategy, parameters): {arms}. Needle: {s.needle_type}, lengths "
        f"{', '.join(map(str, lengths))} x {s.needle_depths} depths, score = mean over the "
        f"cells. Loss: held-out documents (last {s.valid_fraction:g} of each domain; "
        + ", ".join(f"{d.removeprefix('RedPajama')} {n}" for d, n in docs.items())
        + f"), positions < {s.short_length} and {s.short_length}-{s.long_length}; Δ against "
        f"{REFERENCE} within each seed. Realised shares: audit of the training index the "
        "trainer built.", "",
        *summary_lines(settings, results), "",
        "## Needle by length (mean ± 95% half-width over seeds)", "", *needle_lines, "",
        *_domain_table(results, "long", f"## Δ loss per domain, positions {s.short_length}-"
                       f"{s.long_length} (beyond the stage-1 window; mean ± 95% half-width)"),
        "",
        *_domain_table(results, "short", f"## Δ loss per domain, positions < "
                       f"{s.short_length} (mean ± 95% half-width)"), "",
        "## Realised domain shares (audit, mean over seeds)", "", *share_lines, "",
        *_position_lines(settings, results),
        "Per-seed rows: results.json `seeds`. Plots: plots/loss_by_position.png, "
        "plots/loss_by_position_long_documents.png, "
        "plots/domain_loss_delta.png, plots/domain_shares.png (means over seeds); needle "
        "heatmaps: seeds/*/strategies/*/eval/needle/heatmap.png.",
    ]


def _position_lines(settings: AblationSettings, results: dict[str, Any]) -> list[str]:
    """Loss by position on the held-out documents of at least the long length (the same
    documents in every bucket), mean over seeds: stage 1 and every arm; nothing when some
    evaluation found no such document."""
    runs = list(results["seeds"].values())
    evals = {"stage 1 (before)": [r["stage1"] for r in runs],
             **{a: [r["strategies"][a] for r in runs if a in r["strategies"]]
                for a in results["summary"]["arms"]}}
    if not all(e.get("long_document_buckets") for g in evals.values() for e in g):
        return []
    means = {n: _mean_buckets(g, "long_document_buckets")["buckets"] for n, g in evals.items()}
    first = next(iter(means.values()))
    docs = runs[0]["stage1"].get("long_documents", {})
    lines = [f"## Loss by position, held-out documents of >= {settings.long_length} tokens "
             "(mean over seeds)", "",
             "The same documents in every bucket (" + ", ".join(
                 f"{d.removeprefix('RedPajama')} {n}" for d, n in docs.items())
             + "): how much each position gains from the context before it.", "",
             "| checkpoint | " + " | ".join(f"{b['start']}-{b['end']}" for b in first) + " |",
             "|---|" + "---|" * len(first)]
    lines += [f"| {n} | " + " | ".join(_num(b["loss"], ".3f") for b in rows) + " |"
              for n, rows in means.items()]
    return [*lines, ""]


def _mean_buckets(evals: list[dict[str, Any]], key: str = "buckets") -> dict[str, Any]:
    """Bucket rows whose loss is the mean over `evals` (same edges) of their `key` rows."""
    rows = []
    for k, bucket in enumerate(evals[0][key]):
        losses = [e[key][k]["loss"] for e in evals if e[key][k]["loss"] is not None]
        rows.append({**bucket, "loss": sum(losses) / len(losses) if losses else None})
    return {"buckets": rows}


def write_plots(settings: AblationSettings, paths: AblationPaths,
                results: dict[str, Any]) -> None:
    """Loss by position (stage 1 and every arm on one plot), per-domain loss changes
    against the reference, realised domain shares: means over the seeds."""
    runs, summary = results["seeds"], results["summary"]
    arms = list(summary["arms"])
    evals = {"stage 1 (before)": [r["stage1"] for r in runs.values()],
             **{a: [r["strategies"][a] for r in runs.values() if a in r["strategies"]]
                for a in arms}}
    curves = {name: _mean_buckets(e) for name, e in evals.items()}
    plot_position_curves(curves, paths.plots / "loss_by_position.png",
                         marks=(settings.short_length,),
                         title="Loss by position on held-out documents (all domains), "
                         "before stage 2 and after it per mixture (mean over seeds)")
    if all(e.get("long_document_buckets") for group in evals.values() for e in group):
        plot_position_curves(
            {name: _mean_buckets(e, "long_document_buckets") for name, e in evals.items()},
            paths.plots / "loss_by_position_long_documents.png",
            marks=(settings.short_length,),
            title=f"Loss by position on held-out documents of >= {settings.long_length} "
            "tokens (the same documents in every bucket; mean over seeds)")
    domains, shares, long = _mean_shares(results)
    deltas = {a: {part: {d: stat["mean"] for d, stat in row[f"delta_{part}"].items()}
                  for part in ("short", "long")}
              for a, row in summary["arms"].items() if a != REFERENCE}
    if deltas and REFERENCE in arms:
        plot_domain_deltas(deltas, [*domains, "all"], paths.plots / "domain_loss_delta.png",
                           panels=(("short", f"positions < {settings.short_length}"),
                                   ("long", f"positions {settings.short_length}-"
                                    f"{settings.long_length}")))
    plot_domain_shares(shares, long, domains, paths.plots / "domain_shares.png")


# --------------------------------------------------------------------------------------------
# on the demo corpus (`make ablation`)
# --------------------------------------------------------------------------------------------
# The demo's held-out share and documents per domain come from pipeline.py (DEMO_VALID_FRACTION,
# DEMO_PPL_DOCS): at 0.1 Book (9 documents) and ArXiv (51) hold out 1 and 5. Stage 1 is planned
# with the same share, so no checkpoint ever trained on a document the loss is measured on.
#: Seeds per arm of `make ablation` (`tools/demo.py --seeds`).
DEMO_SEEDS = 3


def demo_ablation_settings(demo: Any, paths: Any, seeds: int = DEMO_SEEDS,
                           arms: tuple[str, ...] = ABLATION_ARMS) -> AblationSettings:
    """The comparison on the demo's corpus and stage 1 (`DemoSettings`, `DemoPaths`): its
    stage-2 length, base, steps and tokens per step, long fraction, SlimPajama domain weights,
    the synthetic-fact needle as the demo scores it, `seeds` seeds of each of `arms`."""
    from megatron_longctx.demo.pipeline import NEEDLE_NEW_TOKENS

    return AblationSettings(
        data_prefix=(f"{paths.data_prefix}_*_text_document",),
        stage1_checkpoint=str(paths.checkpoints / "stage1"),
        tokenizer_model=str(paths.tokenizer), model_preset=demo.model_preset,
        short_length=demo.short_length, long_length=demo.long_length,
        long_rotary_base=demo.long_rotary_base, stage2_iters=demo.stage2_iters,
        tokens_per_step=demo.tokens_per_step, long_fraction=demo.long_fraction,
        domain_weights="slimpajama", valid_fraction=DEMO_VALID_FRACTION,
        needle_type="synthetic-fact", needle_depths=demo.needle_depths,
        needle_new_tokens=NEEDLE_NEW_TOKENS, ppl_docs_per_domain=DEMO_PPL_DOCS, seeds=seeds,
        strategies=tuple(arms))


def run_demo_ablation(demo: Any, output_dir: str | Path, seeds: int = DEMO_SEEDS,
                      arms: tuple[str, ...] = ABLATION_ARMS) -> AblationResult:
    """`make ablation`: the demo's corpus, tokenizer, datasets and stage 1 (its settings, the
    held-out share `DEMO_VALID_FRACTION`), then `run_ablation` on them with `seeds` seeds of
    `arms`, all in `output_dir`.

    Resumable like `run_ablation` (more seeds extend it); a complete stage-1 checkpoint there
    is reused (a rerun with other demo settings is refused: `demo_settings.json`).

    Raises:
        FileNotFoundError, ValueError, subprocess.CalledProcessError: as `run_ablation`.
    """
    from megatron_longctx.checkpoint.meta import resolve_checkpoint
    from megatron_longctx.demo import pipeline

    paths = pipeline.DemoPaths(Path(output_dir).resolve())
    settings = demo_ablation_settings(demo, paths, seeds, arms)  # validated before any work
    wanted = json.loads(json.dumps({k: v for k, v in asdict(demo).items()
                                    if k not in ("workers", "strategy")}))
    marker = paths.root / "demo_settings.json"
    if marker.is_file() and json.loads(marker.read_text()) != wanted:
        raise ValueError(f"--output-dir {paths.root} holds an ablation of other demo settings "
                         "(demo_settings.json); use another --output-dir or remove it")
    paths.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, wanted)
    if resolve_checkpoint(paths.checkpoints / "stage1") is None:
        pipeline.prepare_data(demo, paths)
        pipeline.print_dataset_table(paths)
        pipeline.plan_stage1(demo, paths, valid_fraction=DEMO_VALID_FRACTION)
        pipeline.train_stage1(demo, paths)
    else:
        print(f"stage 1: reusing {paths.checkpoints / 'stage1'}", flush=True)
    return run_ablation(settings, paths.root)
