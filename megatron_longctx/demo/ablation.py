"""The paper's data-mixture comparison (Fu et al. 2024, Table 5) as one call, on any data.

From one stage-1 checkpoint and one set of per-domain datasets, each strategy of the planner
(`original`, `per-source`, `global`, `domain-upsample` of the long-document domains, `cut` at
the stage-1 length) is planned (mixture/planner.py, one plan directory per strategy), trained
for the same number of tokens with the same seed through the real trainer (pretrain_longctx.py
as a subprocess, the demo's stage-2 command: `pipeline.Stage2Run`), and evaluated:

- **needle** at the extended length (eval/needle.py's `run_needle`: the synthetic-fact needle
  on the demo corpus, the paper's needle and template for other data, as tools/eval_needle.py
  does by default);
- **loss per domain** on the held-out documents (the last `--valid-fraction` of each domain's
  documents: the plans' validation split, never trained on by any strategy), from eval/ppl.py's
  `run_ppl` at the long length with buckets that resolve both lengths: "short" is the mean loss
  at positions 1 .. short-1 (what the stage-1 window sees; with causal attention identical to
  evaluating at the short length), "long" the mean at positions short .. long-1 (only reachable
  with the extended context). Same documents for every checkpoint;
- **realised shares** of what was trained on: the domain shares and the share of tokens from
  long documents, counted by mixture/audit.py's `audit_datasets` over the training index built
  with the trainer's own call (`build_plan_datasets`, its sample count, seed and cache
  directory). `index_from_trainer_cache` records that the audit created no new index file,
  i.e. it read the very index files the trainer built or loaded.

The evaluations run in this process through the eval library (the same functions the eval
tools call): 6 checkpoints x 3 tool starts would add ~3-4 minutes of Python/torch start-up on
the 2-core machine. Training stays a subprocess of the real trainer.

Outputs under the output directory: `strategies/{name}/` (plan, checkpoint, needle and ppl
results, `result.json`), `stage1/` (the "before" evaluation), `plots/*.png`, `results.json`
and `report.md`. Resumable: `result.json` is written atomically last in each strategy's
directory; a rerun skips strategies that have one and redoes the others from scratch (a
killed strategy's partial directory is removed first). A rerun with other settings is refused
(`ablation_settings.json`). Deterministic: CPU training, planning and evaluation are seeded, so
a rerun gives the same numbers (tests/unit/test_ablation.py checks it for one strategy).
"""

from __future__ import annotations

import glob
import json
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from megatron_longctx.atomic import write_json_atomic, write_text_atomic
from megatron_longctx.config.flags import Flag, flag_of, option
from megatron_longctx.config.mixture import STRATEGIES, MixtureConfig
from megatron_longctx.config.presets import PRESETS
from megatron_longctx.demo.pipeline import MIN_PLAN_TOKENS, Stage2Run, run_tool
from megatron_longctx.demo.plots import (
    plot_domain_deltas,
    plot_domain_shares,
    plot_position_curves,
    position_bucket_edges,
)
from megatron_longctx.eval.needle import NEEDLE_TYPES

FORMAT = "megatron-longctx-ablation/1"
#: Default order: the reference first, so every later row has its deltas as soon as it is done.
ABLATION_STRATEGIES = ("original", "per-source", "global", "domain-upsample", "cut")
#: Loss changes are measured against this strategy (the paper's Table 5 baseline).
REFERENCE = "original"
SETTINGS_FILE = "ablation_settings.json"
RESULT_FILE = "result.json"

__all__ = ["ABLATION_STRATEGIES", "AblationPaths", "AblationResult", "AblationSettings",
           "auto_upsample_domains", "demo_ablation_settings", "loss_split", "parse_names",
           "resolve_prefixes", "run_ablation", "run_demo_ablation", "summary_lines",
           "table_rows"]


def parse_names(text: str) -> tuple[str, ...]:
    """``a,b , c`` -> ('a', 'b', 'c') (empty items dropped)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


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
    strategies: tuple[str, ...] = option(ABLATION_STRATEGIES, Flag(
        "--strategies", "strategies to compare, in run order", parse=parse_names, one_value=True,
        metavar="NAME,...", default_help=",".join(ABLATION_STRATEGIES)))
    long_fraction: float = option(0.9, Flag(
        "--long-fraction", "per-source: long share inside each domain; global: overall long share"))
    upsample_domains: tuple[str, ...] = option((), Flag(
        "--upsample-domains",
        "domain-upsample's domains (auto: those whose natural share of tokens in long documents "
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
    needle_depths: int = option(10, Flag("--needle-depths", "needle depths"))
    needle_new_tokens: int = option(50, Flag(
        "--needle-new-tokens", "greedy tokens generated per needle prompt"))
    ppl_docs_per_domain: int = option(16, Flag(
        "--ppl-docs-per-domain", "held-out documents per domain for the loss"))
    seed: int = option(1234, Flag("--seed", "seed of the plans, the trainer and the needles"))

    def __post_init__(self) -> None:
        by_name = {f.name: f for f in fields(self)}
        for name in ("short_length", "long_rotary_base", "stage2_iters", "tokens_per_step",
                     "needle_depths", "needle_new_tokens", "ppl_docs_per_domain"):
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
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies or len(set(self.strategies)) < len(self.strategies):
            raise ValueError(f"--strategies: distinct names among {STRATEGIES}, "
                             f"got {list(self.strategies)}")
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
        """Samples each strategy's stage 2 trains on (equal for all)."""
        return self.stage2_iters * self.global_batch


@dataclass(frozen=True)
class AblationPaths:
    """Where the comparison writes, under one output directory."""

    root: Path

    @property
    def settings(self) -> Path:
        return self.root / SETTINGS_FILE

    @property
    def stage1(self) -> Path:
        """The stage-1 checkpoint's evaluation (the "before" row)."""
        return self.root / "stage1"

    def strategy(self, name: str) -> Path:
        return self.root / "strategies" / name

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


def auto_upsample_domains(prefixes: list[str], long_threshold: int) -> list[str]:
    """The long-document domains: those whose natural share of tokens in documents longer
    than `long_threshold` exceeds the corpus's (token-weighted over all domains).

    On the demo corpus at 512 tokens (corpus 19.3%): Book 100%, ArXiv 98%, Github 19.5% (the
    paper's Book/ArXiv/GitHub); CommonCrawl (18.3%) falls just below.
    """
    from megatron_longctx.data.stats import tokens_longer_than
    from megatron_longctx.mixture.planner import load_domain_stats

    entries = load_domain_stats(prefixes)
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
    """Record the settings and the inputs' identity (`input_identity`) beside the results;
    refuse a directory made with other ones.

    Raises:
        ValueError: `paths.settings` exists with other settings or inputs (names the fields).
    """
    wanted = json.loads(json.dumps({**asdict(settings), **(inputs or {})}))
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
# one strategy: plan, train, audit, evaluate
# --------------------------------------------------------------------------------------------
def strategy_config(settings: AblationSettings, strategy: str, prefixes: list[str],
                    output_dir: Path, upsample: list[str]) -> MixtureConfig:
    """The planner's config for `strategy`: the stage-2 length and budget, "long" = longer
    than the stage-2 length, `cut` at the stage-1 length, the long fraction for per-source and
    global, `upsample` x `upweight_factor` for domain-upsample.

    The plan's budget is the trained tokens, floored at `MIN_PLAN_TOKENS` like the demo's (a
    smaller plan subsamples small domains to nothing); shares do not depend on it.
    """
    extra: dict[str, Any] = {}
    if strategy in ("per-source", "global"):
        extra["long_fraction"] = settings.long_fraction
    elif strategy == "cut":
        extra["cut_length"] = settings.short_length
    elif strategy == "domain-upsample":
        extra["upweight"] = {d: settings.upweight_factor for d in upsample}
    return MixtureConfig(
        data_prefixes=list(prefixes), output_dir=str(output_dir), strategy=strategy,
        domain_weights=settings.domain_weights, long_threshold=settings.long_length,
        train_tokens=float(max(settings.train_samples * settings.long_length,
                               MIN_PLAN_TOKENS)),
        seq_length=settings.long_length, valid_fraction=settings.valid_fraction,
        seed=settings.seed, **extra)


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


def evaluate_checkpoint(settings: AblationSettings, checkpoint: Path, eval_dir: Path,
                        sources: list[Any], training_length: int) -> dict[str, Any]:
    """Needle at the long length and loss by position and domain on the held-out documents,
    in this process (eval/needle.py `run_needle`, eval/ppl.py `run_ppl`)."""
    from megatron_longctx.eval.models import load_causal_lm
    from megatron_longctx.eval.needle import NeedleSettings, depth_grid, run_needle
    from megatron_longctx.eval.ppl import run_ppl

    edges = position_bucket_edges(settings.short_length, settings.long_length)
    model = load_causal_lm(checkpoint, tokenizer_model=settings.tokenizer_model)
    try:
        needle = run_needle(model, NeedleSettings(
            lengths=[settings.long_length], depths=depth_grid(settings.needle_depths),
            needle_type=settings.needle_type, max_new_tokens=settings.needle_new_tokens,
            seed=settings.seed, training_length=training_length),
            eval_dir / f"needle_{settings.long_length}", overwrite=True, log=None)
        ppl = run_ppl(model, sources, eval_dir / "ppl", seq_length=settings.long_length,
                      edges=edges, min_length=settings.short_length,
                      max_docs_per_domain=settings.ppl_docs_per_domain, log=None)
    finally:
        model.close()
    return {
        "needle": needle["overall"],
        "needle_cells": "".join("x" if c["score"] >= 50 else "." for c in needle["cells"]),
        "loss": {"all": loss_split(ppl["buckets"], settings.short_length),
                 **{d: loss_split(v["buckets"], settings.short_length)
                    for d, v in sorted(ppl["domains"].items())}},
        "documents": {d: v["documents"] for d, v in sorted(ppl["domains"].items())},
        "buckets": ppl["buckets"],
    }


def run_strategy(settings: AblationSettings, paths: AblationPaths, strategy: str,
                 prefixes: list[str], upsample: list[str], sources: list[Any]) -> dict:
    """Plan, train, audit and evaluate one strategy into a fresh directory; `result.json`
    (written atomically, last) marks it done."""
    from megatron_longctx.mixture.outputs import write_plan_outputs
    from megatron_longctx.mixture.planner import plan_mixture

    start = time.time()
    root = paths.strategy(strategy)
    if root.exists():
        shutil.rmtree(root)  # a killed attempt: start this strategy over
    cfg = strategy_config(settings, strategy, prefixes, root / "mixture", upsample)
    plan = plan_mixture(cfg)
    write_plan_outputs(plan, cfg.output_dir)
    for warning in plan.warnings:
        print(f"   plan warning: {warning}", flush=True)
    run = Stage2Run(settings.model_preset, Path(settings.tokenizer_model), root / "mixture",
                    settings.long_length, settings.long_rotary_base, settings.stage2_iters,
                    settings.tokens_per_step, Path(settings.stage1_checkpoint),
                    root / "checkpoint", root / "tensorboard",
                    extra=("--seed", str(settings.seed)))
    run_tool(f"stage 2 ({strategy}): {settings.stage2_iters} steps x "
             f"{settings.global_batch * settings.long_length} tokens at {settings.long_length}",
             run.train_args())
    realized = realized_shares(settings, root / "mixture")
    print(f"   realised: long-document tokens {realized['long_share']:.1%}, domains "
          + ", ".join(f"{d.removeprefix('RedPajama')} {s:.1%}"
                      for d, s in realized["domain_shares"].items()), flush=True)
    evaluation = evaluate_checkpoint(settings, root / "checkpoint", root / "eval", sources,
                                     settings.long_length)
    result = {"strategy": strategy, "plan": {"details": plan.details,
                                             "warnings": list(plan.warnings),
                                             "train_tokens": plan.train_tokens},
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


def _progress(k: int, total: int, name: str, start: float, durations: list[float]) -> None:
    eta = (f", ~{(total - k) * sum(durations) / len(durations) / 60:.0f} min left"
           if durations else "")
    print(f"\n==== [ablation {k + 1}/{total}] {name} (elapsed "
          f"{(time.time() - start) / 60:.1f} min{eta})", flush=True)


def run_ablation(settings: AblationSettings, output_dir: str | Path) -> AblationResult:
    """Evaluate the stage-1 checkpoint, run every strategy not done yet, write the report.

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
    stage1 = _load_done(paths.stage1 / RESULT_FILE)
    if stage1 is None:
        _progress(-1, len(settings.strategies), "stage-1 checkpoint (before stage 2)", start, [])
        stage1 = evaluate_checkpoint(settings, Path(settings.stage1_checkpoint),
                                     paths.stage1 / "eval", sources, settings.short_length)
        write_json_atomic(paths.stage1 / RESULT_FILE, stage1)
    done: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(settings.strategies):
        done[name] = _load_done(paths.strategy(name) / RESULT_FILE)
        if done[name] is not None:
            print(f"[ablation {k + 1}/{len(settings.strategies)}] {name}: done before "
                  f"(needle {done[name]['needle']:.1f}), skipped", flush=True)
            continue
        _progress(k, len(settings.strategies), name, start, durations)
        try:
            done[name] = run_strategy(settings, paths, name, prefixes, upsample, sources)
        except PlanError as err:
            raise ValueError(f"{name} plan: {err}") from None
        durations.append(done[name]["seconds"])
    results = build_results(settings, upsample, stage1, done)
    lines = report_lines(settings, results)
    write_plots(settings, paths, results)
    write_json_atomic(paths.root / "results.json", results)
    write_text_atomic(paths.root / "report.md", "\n".join(lines) + "\n")
    return AblationResult(paths, results, lines, summary_lines(settings, results))


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def table_rows(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per strategy: needle, realised long share, domain drift (total variation between the
    realised domain shares and the reference mixture's target domain shares, and the largest
    single shift) and the loss change per domain against `REFERENCE` (None without it).

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
        rows[name] = {"needle": r["needle"], "long_share": real["long_share"],
                      "max_document_repeats": real.get("max_document_repeats"),
                      "domain_drift": 0.5 * sum(abs(v) for v in shift.values()),
                      "largest_shift": {"domain": biggest, "change": shift[biggest]},
                      "delta_short": deltas["short"], "delta_long": deltas["long"]}
    return rows


def build_results(settings: AblationSettings, upsample: list[str], stage1: dict[str, Any],
                  done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """results.json: settings, the stage-1 row, each strategy's result and the table."""
    return {"format": FORMAT, "reference": REFERENCE, "upsample_domains": upsample,
            "stage2_tokens_per_strategy": settings.train_samples * settings.long_length,
            "table": table_rows(done), "stage1": stage1, "strategies": done,
            "seconds": round(sum(r["seconds"] for r in done.values()), 1),
            "settings": asdict(settings)}


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def summary_lines(settings: AblationSettings, results: dict[str, Any]) -> list[str]:
    """The main table (the paper's Table 5 in short): needle, shares, mean loss changes."""
    s, table = settings, results["table"]
    lines = [f"| stage-2 mixture | needle at {s.long_length} | long-doc tokens | most repeated "
             f"doc | domain drift (TV) | largest shift | Δ loss pos < {s.short_length} | Δ loss "
             f"pos {s.short_length}-{s.long_length} |", "|---|---|---|---|---|---|---|---|",
             f"| (stage 1, before) | {_num(results['stage1']['needle'], '.1f')} | - | - | - | - | "
             f"{_num(results['stage1']['loss']['all']['short'], '.3f')} (abs) | "
             f"{_num(results['stage1']['loss']['all']['long'], '.3f')} (abs) |"]
    for name, row in table.items():
        shift = row["largest_shift"]
        ref = results["strategies"][name]["loss"]["all"] if name == REFERENCE else None
        short = (f"{ref['short']:.3f} (abs)" if ref else _num(row["delta_short"]["all"], "+.3f"))
        long = (f"{ref['long']:.3f} (abs)" if ref else _num(row["delta_long"]["all"], "+.3f"))
        lines.append(f"| {name} | {_num(row['needle'], '.1f')} | {row['long_share']:.1%} | "
                     f"{_num(row.get('max_document_repeats'), '.1f')}x | "
                     f"{row['domain_drift']:.1%} | {shift['domain'].removeprefix('RedPajama')} "
                     f"{shift['change']:+.1%} | {short} | {long} |")
    return lines


def _domain_table(results: dict[str, Any], part: str, title: str) -> list[str]:
    table, strategies = results["table"], results["strategies"]
    domains = sorted({d for r in strategies.values() for d in r["loss"] if d != "all"})
    head = [d.removeprefix("RedPajama") for d in domains]
    lines = [title, "", f"| strategy | {' | '.join(head)} | all |",
             "|---|" + "---|" * (len(domains) + 1)]
    if REFERENCE in strategies:
        ref = strategies[REFERENCE]["loss"]
        lines.append(f"| {REFERENCE} (abs) | "
                     + " | ".join(_num(ref.get(d, {}).get(part), ".3f")
                                  for d in [*domains, "all"]) + " |")
    for name, row in table.items():
        if name != REFERENCE:
            cells = [_num(row[f"delta_{part}"].get(d), "+.3f") for d in [*domains, "all"]]
            lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


def report_lines(settings: AblationSettings, results: dict[str, Any]) -> list[str]:
    """report.md: what ran, the main table, per-domain loss changes, realised shares."""
    s, strategies = settings, results["strategies"]
    domains = list(next(iter(strategies.values()))["realized"]["domain_shares"])
    shares = ["| strategy | " + " | ".join(d.removeprefix("RedPajama") for d in domains)
              + " | long-doc tokens |", "|---|" + "---|" * (len(domains) + 1)]
    shares += [f"| {n} | " + " | ".join(f"{r['realized']['domain_shares'][d]:.1%}"
                                        for d in domains)
               + f" | {r['realized']['long_share']:.1%} |" for n, r in strategies.items()]
    docs = results["stage1"]["documents"]
    return [
        "# Stage-2 data-mixture ablation", "",
        f"Every strategy continues {s.stage1_checkpoint} at {s.long_length} tokens (RoPE base "
        f"{s.long_rotary_base}) for {s.stage2_iters} steps x {s.global_batch} samples = "
        f"{results['stage2_tokens_per_strategy']:,} tokens, seed {s.seed}. Long documents: "
        f"> {s.long_length} tokens; per-source/global long fraction {s.long_fraction}; "
        f"domain-upsample: {', '.join(results['upsample_domains'])} x {s.upweight_factor}; "
        f"cut at {s.short_length}. Needle: {s.needle_type}, {s.needle_depths} depths at "
        f"{s.long_length}. Loss: held-out documents (last {s.valid_fraction:g} of each "
        f"domain; " + ", ".join(f"{d.removeprefix('RedPajama')} {n}" for d, n in docs.items())
        + f"), positions < {s.short_length} and {s.short_length}-{s.long_length}; Δ against "
        f"{REFERENCE}. Realised shares: audit of the training index the trainer built.", "",
        *summary_lines(settings, results), "",
        *_domain_table(results, "long", f"## Δ loss per domain, positions {s.short_length}-"
                       f"{s.long_length} (beyond the stage-1 window)"), "",
        *_domain_table(results, "short", f"## Δ loss per domain, positions < "
                       f"{s.short_length}"), "",
        "## Realised domain shares (audit)", "", *shares, "",
        "Plots: plots/loss_by_position.png, plots/domain_loss_delta.png, "
        "plots/domain_shares.png; needle heatmaps: strategies/*/eval/needle_*/heatmap.png.",
    ]


def write_plots(settings: AblationSettings, paths: AblationPaths,
                results: dict[str, Any]) -> None:
    """Loss by position (stage 1 and every strategy on one plot), per-domain loss changes
    against the reference, realised domain shares."""
    strategies = results["strategies"]
    curves = {"stage 1 (before)": results["stage1"],
              **{name: r for name, r in strategies.items()}}
    plot_position_curves(curves, paths.plots / "loss_by_position.png",
                         marks=(settings.short_length,),
                         title="Loss by position on held-out documents (all domains), "
                         "before stage 2 and after it per mixture")
    domains = list(next(iter(strategies.values()))["realized"]["domain_shares"])
    deltas = {n: {"short": row["delta_short"], "long": row["delta_long"]}
              for n, row in results["table"].items() if n != REFERENCE}
    if deltas and REFERENCE in strategies:
        plot_domain_deltas(deltas, [*domains, "all"], paths.plots / "domain_loss_delta.png",
                           panels=(("short", f"positions < {settings.short_length}"),
                                   ("long", f"positions {settings.short_length}-"
                                    f"{settings.long_length}")))
    plot_domain_shares({n: r["realized"]["domain_shares"] for n, r in strategies.items()},
                       {n: r["realized"]["long_share"] for n, r in strategies.items()},
                       domains, paths.plots / "domain_shares.png")


# --------------------------------------------------------------------------------------------
# on the demo corpus (`make ablation`)
# --------------------------------------------------------------------------------------------
#: The demo's held-out share for the ablation: at the demo's 0.01, Book (9 documents) and
#: ArXiv (49) hold out round(0.09) = round(0.49) = 0 documents and get no loss row; at 0.1
#: they hold out 1 and 5 (C4 2,006, CommonCrawl 972). Stage 1 is planned with the same share,
#: so no checkpoint ever trained on a document the loss is measured on.
DEMO_VALID_FRACTION = 0.1
#: Held-out documents per domain for the demo's loss (at least 64 tokens each; 512 read).
DEMO_PPL_DOCS = 16


def demo_ablation_settings(demo: Any, paths: Any) -> AblationSettings:
    """The comparison on the demo's corpus and stage 1 (`DemoSettings`, `DemoPaths`): its
    stage-2 length, base, steps and tokens per step, long fraction, SlimPajama domain weights,
    the synthetic-fact needle as the demo scores it."""
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
        needle_new_tokens=NEEDLE_NEW_TOKENS, ppl_docs_per_domain=DEMO_PPL_DOCS)


def run_demo_ablation(demo: Any, output_dir: str | Path) -> AblationResult:
    """`make ablation`: the demo's corpus, tokenizer, datasets and stage 1 (its settings, the
    held-out share `DEMO_VALID_FRACTION`), then `run_ablation` on them, all in `output_dir`.

    Resumable like `run_ablation`; a complete stage-1 checkpoint there is reused (a rerun with
    other demo settings is refused: `demo_settings.json`).

    Raises:
        FileNotFoundError, ValueError, subprocess.CalledProcessError: as `run_ablation`.
    """
    from megatron_longctx.checkpoint.meta import resolve_checkpoint
    from megatron_longctx.demo import pipeline

    paths = pipeline.DemoPaths(Path(output_dir).resolve())
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
    return run_ablation(demo_ablation_settings(demo, paths), paths.root)
