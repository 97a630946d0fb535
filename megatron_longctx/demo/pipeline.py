"""`make demo`'s pipeline: all four stages on the synthetic corpus, through the tools' own CLIs.

Stage 3 is the paper in miniature: a tiny LLaMA (the `demo` preset, 1.5M parameters) pretrained
from scratch at 64 tokens on the natural mixture (stage 1, RoPE base 100), then continually
pretrained at 8x that length with the RoPE base raised to 1e6 on the per-source mixture with 90%
long-document tokens in each domain (stage 2), both with the real trainer (pretrain_longctx.py,
megatron-core, CPU + gloo here). Stage 4 evaluates both checkpoints with the real eval tools
(needle at both lengths, loss by position and domain, a RULER subset); no result is faked.
Measured numbers and the settings' history: docs/demo.md.

Every stage runs a repository tool as a subprocess (`run_tool`), exactly as a user would type
it, so the demo also tests the CLIs; the cost is one Python start (and torch import) per step. It
therefore needs a checkout (tools/ and pretrain_longctx.py beside the package), as `make demo`
has.

Stages, in order: `prepare_data` (corpus, tokenizer, per-domain datasets), `plan_mixtures`
(stage-1 natural plan, stage-2 plan + audit), `train_stages` (stage 1 from scratch, stage 2 from
it), `evaluate_needles` and `evaluate_ruler` (both checkpoints), then `write_report`
(report.json, report.md, each written atomically). `run_demo` runs them all. The stage-1
steps (`plan_stage1`, `train_stage1`) and the stage-2 trainer command (`Stage2Run`) are
separate so that the mixture ablation (`demo.ablation`, `make ablation`) runs exactly the
demo's stage 1 and, per strategy, exactly its stage 2 (the refactor left every command line of
the demo unchanged: same losses under the same seeds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from megatron_longctx.atomic import write_bytes_atomic
from megatron_longctx.config.flags import Flag, flag_of, option
from megatron_longctx.config.mixture import STRATEGIES
from megatron_longctx.config.presets import PRESETS
from megatron_longctx.demo.plots import plot_position_curves, position_bucket_edges
from megatron_longctx.eval.ppl import RESULTS_NAME as PPL_RESULTS
from megatron_longctx.eval.ruler_tasks import SYNTHETIC_TASKS

#: The repository checkout whose tools/ and pretrain_longctx.py the demo runs.
REPO = Path(__file__).resolve().parents[2]
#: Mixture plans are sized for at least this many tokens: with a few thousand (the reduced test
#: run) the audit of the tiny corpus finds an empty train split in ArXiv (7 documents); the
#: trainer reads only what its steps need either way.
MIN_PLAN_TOKENS = 2_000_000
#: Tokens per word of the demo's 4,096-type BPE on the synthetic corpus (measured: 4M words ->
#: 4.72M tokens). `DemoSettings.corpus_length_scale` uses it to put the stage-2 length where
#: SlimPajama's 4K-token threshold is.
DEMO_TOKENS_PER_WORD = 1.18
#: Share of each domain's documents the demo's plans hold out (the plans' validation split,
#: never trained on): the loss by position is measured on them. At 0.1 the 4M-word corpus
#: holds out ~40 documents of >= 512 tokens (CommonCrawl 16 of them read, C4 ~10, GitHub 16,
#: ArXiv 5, Book 1); at 0.01 it was ~12 and the curve moved by 0.2 nats between buckets
#: from document to document. The mixture ablation holds out the same share.
DEMO_VALID_FRACTION = 0.1
#: Held-out documents per domain read for the loss by position.
DEMO_PPL_DOCS = 16
#: Needle answers must come within this many generated tokens (a code word is one token).
NEEDLE_NEW_TOKENS = 2

__all__ = ["DemoPaths", "DemoResult", "DemoSettings", "REPO", "Stage2Run", "batch_flags",
           "build_report", "common_train_args", "evaluate_needles", "evaluate_ruler",
           "plan_mixtures", "plan_stage1", "prepare_data", "print_dataset_table",
           "report_lines", "run_demo", "run_tool", "stage1_train_args", "stage2_run",
           "summary_lines", "train_stage1", "train_stages", "write_report"]


#: The RULER subset `make demo` reports: the single needle in noise (the demo needle's closest
#: RULER relative) and frequent-word extraction (partial credit per word). Measured on the demo's
#: checkpoints (docs/demo.md): 0 before and after stage 2, as for every task that fits 512
#: tokens: RULER's answers are multi-token strings (7-digit numbers, UUIDs, coded words) in an
#: unseen prompt format, and the demo model only learned to copy one code-word token.
DEFAULT_RULER_TASKS = ("niah_single_1", "fwe")
#: Samples per RULER task and checkpoint: 10 keep the step at ~65 s on the shared 2-core CI
#: machine (two tool starts of ~12 s each; niah 128 new tokens, fwe 50 per sample).
RULER_SAMPLES = 10


def parse_ruler_tasks(text: str) -> tuple[str, ...]:
    """``--ruler-tasks`` text -> task names (``none`` or empty: no RULER step)."""
    if text.strip().lower() == "none":
        return ()
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _cpu_count() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo's numbers depend on; tools/demo.py's flags are these fields.

    The defaults are the measured ones of docs/demo.md (needle at 512 tokens 0 -> 95 across
    stage 2 in 7.5 minutes on 2 cores); each was chosen against alternatives there (e.g. stage-1
    RoPE base 10,000 already retrieves at 512 before any extension, long fraction 0.7 gives
    60-70 instead of 95). Validated on construction; ValueError names the flag.
    """

    total_words: int = option(4_000_000, Flag("--total-words", "synthetic corpus size in words"))
    workers: int = option(default_factory=_cpu_count, flag=Flag(
        "--workers", "preprocessing worker processes", default_help="the number of CPUs"))
    model_preset: str = option("demo", Flag("--model-preset", "model shape (config/presets.py)"))
    short_length: int = option(64, Flag("--short-length", "stage-1 sequence length"))
    long_length: int = option(512, Flag(
        "--long-length", "stage-2 sequence length (the extension)"))
    short_rotary_base: int = option(100, Flag("--short-rotary-base", "stage-1 RoPE base"))
    long_rotary_base: int = option(1000000, Flag(
        "--long-rotary-base", "raised RoPE base for stage 2 (Fu et al.: raise it, then train)"))
    stage1_iters: int = option(1000, Flag("--stage1-iters", "stage-1 training steps"))
    stage2_iters: int = option(400, Flag("--stage2-iters", "stage-2 training steps"))
    stage1_tokens_per_step: int = option(4096, Flag(
        "--stage1-tokens-per-step", "stage-1 tokens per step"))
    tokens_per_step: int = option(8192, Flag("--tokens-per-step", "stage-2 tokens per step"))
    strategy: str = option("per-source", Flag(
        "--strategy", "stage-2 data mixture (tools/blend_mixture.py --strategy)",
        choices=STRATEGIES))
    long_fraction: float = option(0.9, Flag(
        "--long-fraction", "stage-2 share of long documents' tokens within each domain"))
    needle_depths: int = option(20, Flag("--needle-depths", "needle depths per length"))
    ruler_tasks: tuple[str, ...] = option(DEFAULT_RULER_TASKS, Flag(
        "--ruler-tasks",
        "RULER tasks run at --long-length on both checkpoints (tools/eval_ruler.py --tasks; "
        "'none': skip)", parse=parse_ruler_tasks, one_value=True, metavar="TASK,...",
        default_help=",".join(DEFAULT_RULER_TASKS)))
    ruler_samples: int = option(RULER_SAMPLES, Flag("--ruler-samples", "samples per RULER task"))

    @property
    def corpus_length_scale(self) -> float:
        """Words per real token of the synthetic corpus (tools/make_corpus.py --length-scale):
        the stage-2 length plays SlimPajama's 4K-token threshold, so each domain's share of
        tokens in documents longer than `long_length` is the share real SlimPajama has beyond
        4K (data/synthetic.py `long_token_share`: C4 6%, CommonCrawl 37%, Books 100%, ...).
        At 512 tokens: 512 / 4096 / 1.18 = 0.106 (C4's median document: 39 tokens)."""
        return self.long_length / 4096 / DEMO_TOKENS_PER_WORD

    def __post_init__(self) -> None:
        at_least_one = ("total_words", "workers", "short_length", "short_rotary_base",
                        "long_rotary_base", "stage1_iters", "stage2_iters",
                        "stage1_tokens_per_step", "tokens_per_step", "needle_depths")
        by_name = {f.name: f for f in fields(self)}
        for name in at_least_one:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag_of(by_name[name])} must be an integer >= 1, "
                                 f"got {value!r}")
        if self.long_length <= self.short_length:
            raise ValueError(f"--long-length must be > --short-length ({self.short_length}): "
                             f"stage 2 extends the context, got {self.long_length}")
        if self.model_preset not in PRESETS:
            raise ValueError(f"--model-preset must be one of {sorted(PRESETS)}, "
                             f"got {self.model_preset!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not 0.0 < self.long_fraction < 1.0:
            raise ValueError(f"--long-fraction must be in (0, 1), got {self.long_fraction}")
        unknown = [t for t in self.ruler_tasks if t not in SYNTHETIC_TASKS]
        if unknown:
            raise ValueError(f"--ruler-tasks: {unknown} not among {list(SYNTHETIC_TASKS)} "
                             "(the QA tasks need external files)")
        if self.ruler_samples < 1:
            raise ValueError(f"--ruler-samples must be >= 1, got {self.ruler_samples}")


@dataclass(frozen=True)
class DemoPaths:
    """Where each stage writes, under one output directory."""

    root: Path

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def data_prefix(self) -> Path:
        """Prefix of the per-domain datasets (``{prefix}_{domain}_text_document``)."""
        return self.root / "data" / "slimpajama"

    @property
    def mixture_stage1(self) -> Path:
        return self.root / "mixture_stage1"

    @property
    def mixture(self) -> Path:
        """Stage 2's plan (the one the report and the loss evaluation use)."""
        return self.root / "mixture"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def eval(self) -> Path:
        return self.root / "eval"


def run_tool(step: str, args: list[str]) -> None:
    """Print the step and its command line, run it with this Python in the repository, print
    its duration. Raises `subprocess.CalledProcessError` when it fails."""
    print(f"\n== {step}\n$ {' '.join(args)}", flush=True)
    start = time.time()
    subprocess.run([sys.executable, *args], check=True, cwd=REPO)
    print(f"   ({time.time() - start:.1f} s)", flush=True)


# --------------------------------------------------------------------------------------------
# stages 1-3
# --------------------------------------------------------------------------------------------
def prepare_data(settings: DemoSettings, paths: DemoPaths) -> None:
    """Stage 1: the corpus (7 domains, .jsonl.zst), a 4,096-type byte-level BPE trained on it,
    and one Megatron indexed dataset per domain with its stats file."""
    run_tool("1a. synthetic SlimPajama-style corpus (7 domains, .jsonl.zst chunks)",
             ["tools/make_corpus.py", "--output-dir", str(paths.corpus),
              "--total-words", str(settings.total_words),
              "--length-scale", repr(settings.corpus_length_scale)])
    run_tool("1b. byte-level BPE tokenizer trained offline",
             ["tools/train_tokenizer.py", "--input", str(paths.corpus), "--output-dir",
              str(paths.tokenizer), "--vocab-size", "4096"])
    run_tool("1c. preprocess: per-domain Megatron indexed datasets + stats",
             ["tools/preprocess_data.py", "--input", str(paths.corpus), "--output-prefix",
              str(paths.data_prefix), "--tokenizer-type", "HuggingFaceTokenizer",
              "--tokenizer-model", str(paths.tokenizer), "--append-eod",
              "--domain-key", "meta.redpajama_set_name", "--workers", str(settings.workers)])


def print_dataset_table(paths: DemoPaths) -> None:
    """Documents, tokens, median length and share of tokens in documents over 4K tokens per
    domain, from the stats files (the mixture planner's only input)."""
    print("\n== per-domain datasets (from the stats files)")
    print(f"{'domain':26s} {'docs':>8s} {'tokens':>11s} {'median':>8s} {'>4K share':>9s}")
    pattern = f"{paths.data_prefix.name}_*_text_document.stats.json"
    for stats_path in sorted(paths.data_prefix.parent.glob(pattern)):
        s = json.loads(stats_path.read_text())
        long_share = s["tokens_longer_than"]["4096"] / max(s["tokens"], 1)
        print(f"{s['domain']:26s} {s['documents']:8,d} {s['tokens']:11,d} "
              f"{s['length']['median']:8.0f} {long_share:9.1%}")


def stage2_mixture_flags(settings: DemoSettings) -> list[str]:
    """The stage-2 plan's strategy-specific flags: the long fraction for the upsampling
    strategies (per-source, global); for `cut`, documents cut at the stage-1 length (the
    paper's "cut at 4K" baseline); nothing for the others."""
    if settings.strategy in ("per-source", "global"):
        return ["--long-fraction", str(settings.long_fraction)]
    if settings.strategy == "cut":
        return ["--cut-length", str(settings.short_length)]
    return []


def plan_stage1(settings: DemoSettings, paths: DemoPaths,
                valid_fraction: float = DEMO_VALID_FRACTION) -> None:
    """Stage 2a: stage 1 trains on the natural mixture (the base model's pretraining data).

    `valid_fraction` is the share of each domain's documents held out (`DEMO_VALID_FRACTION`,
    the same as stage 2's, so that neither stage trains on the documents evaluated)."""
    stage1_tokens = max(settings.stage1_iters * settings.stage1_tokens_per_step,
                        MIN_PLAN_TOKENS)
    run_tool("2a. stage-1 mixture plan: the natural (original) mixture",
             ["tools/blend_mixture.py", "--data-prefix", f"{paths.data_prefix}_*_text_document",
              "--output-dir", str(paths.mixture_stage1), "--strategy", "original",
              "--train-tokens", str(stage1_tokens), "--seq-length", str(settings.short_length),
              "--valid-fraction", str(valid_fraction)])


def plan_mixtures(settings: DemoSettings, paths: DemoPaths) -> None:
    """Stage 2: stage 1 trains on the natural mixture (`plan_stage1`), stage 2 on the chosen
    one, "long" meaning a document that fills the extended window; the stage-2 plan is audited
    against the training index the trainer builds (exit 3 on drift)."""
    plan_stage1(settings, paths)
    stage2_tokens = max(settings.stage2_iters * settings.tokens_per_step, MIN_PLAN_TOKENS)
    run_tool(f"2b. stage-2 mixture plan ({settings.strategy}) + audit of the realized "
             "training index",
             ["tools/blend_mixture.py", "--data-prefix", f"{paths.data_prefix}_*_text_document",
              "--output-dir", str(paths.mixture), "--strategy", settings.strategy,
              *stage2_mixture_flags(settings), "--long-threshold", str(settings.long_length),
              "--train-tokens", str(stage2_tokens), "--seq-length", str(settings.long_length),
              "--valid-fraction", str(DEMO_VALID_FRACTION), "--audit"])


def batch_flags(seq_length: int, tokens_per_step: int) -> list[str]:
    """Micro/global batch giving `tokens_per_step` tokens per step (micro-batch = global: one
    rank, no accumulation)."""
    gbs = max(tokens_per_step // seq_length, 1)
    return ["--micro-batch-size", str(gbs), "--global-batch-size", str(gbs)]


def common_train_args(model_preset: str, tokenizer: str | os.PathLike[str]) -> list[str]:
    """The trainer flags both stages share: model, tokenizer, weight decay 0.1, clipping 1.0."""
    return ["pretrain_longctx.py", "--model-preset", model_preset,
            "--tokenizer-model", str(tokenizer), "--weight-decay", "0.1",
            "--log-interval", "50", "--clip-grad", "1.0"]


def stage1_train_args(settings: DemoSettings, paths: DemoPaths) -> list[str]:
    """Stage 1's trainer command: from scratch at the short length, lr 3e-3 cosine to 3e-4
    after 20 warmup steps, on the natural mixture."""
    ckpt, tb = paths.checkpoints, paths.tensorboard
    return [*common_train_args(settings.model_preset, paths.tokenizer),
            *batch_flags(settings.short_length, settings.stage1_tokens_per_step),
            "--mixture-plan", str(paths.mixture_stage1 / "mixture_plan.json"),
            "--data-cache-path", str(paths.mixture_stage1 / "cache"),
            "--seq-length", str(settings.short_length),
            "--rotary-base", str(settings.short_rotary_base),
            "--train-iters", str(settings.stage1_iters), "--lr", "3e-3", "--min-lr", "3e-4",
            "--lr-warmup-iters", "20", "--lr-decay-style", "cosine",
            "--save", str(ckpt / "stage1"), "--tensorboard-dir", str(tb / "stage1")]


@dataclass(frozen=True)
class Stage2Run:
    """One stage-2 run of the trainer: continue a checkpoint at the long length.

    The demo's stage 2 and each strategy of the mixture ablation (`demo.ablation`) are one of
    these; `train_args` is the trainer's command line, so both train identically."""

    model_preset: str
    tokenizer: Path
    mixture_dir: Path
    seq_length: int
    rotary_base: int
    iters: int
    tokens_per_step: int
    load: Path
    save: Path
    tensorboard: Path
    extra: tuple[str, ...] = ()

    def train_args(self) -> list[str]:
        """From `load`'s weights (``--load --finetune``: new optimizer and step count) with
        the raised RoPE base and a constant lr 1e-3; its data cache beside the plan."""
        return [*common_train_args(self.model_preset, self.tokenizer),
                *batch_flags(self.seq_length, self.tokens_per_step),
                "--mixture-plan", str(self.mixture_dir / "mixture_plan.json"),
                "--data-cache-path", str(self.mixture_dir / "cache"),
                "--seq-length", str(self.seq_length),
                "--rotary-base", str(self.rotary_base),
                "--train-iters", str(self.iters), "--lr", "1e-3",
                "--lr-decay-style", "constant", "--load", str(self.load), "--finetune",
                "--save", str(self.save), "--tensorboard-dir", str(self.tensorboard),
                *self.extra]


def stage2_run(settings: DemoSettings, paths: DemoPaths) -> Stage2Run:
    """The demo's stage 2: from stage 1, on the stage-2 plan in `paths.mixture`."""
    return Stage2Run(settings.model_preset, paths.tokenizer, paths.mixture,
                     settings.long_length, settings.long_rotary_base, settings.stage2_iters,
                     settings.tokens_per_step, paths.checkpoints / "stage1",
                     paths.checkpoints / "stage2", paths.tensorboard / "stage2")


def train_stage1(settings: DemoSettings, paths: DemoPaths) -> None:
    """Stage 3a: pretrain from scratch at the short length (`stage1_train_args`)."""
    run_tool(f"3a. stage 1: pretrain {settings.model_preset} from scratch at "
             f"{settings.short_length} tokens", stage1_train_args(settings, paths))


def train_stages(settings: DemoSettings, paths: DemoPaths) -> None:
    """Stage 3: from scratch at the short length (lr 3e-3 cosine to 3e-4, 20 warmup steps),
    then from that checkpoint's weights (``--load --finetune``: new optimizer and step count) at
    the long length with the raised RoPE base and a constant lr 1e-3."""
    train_stage1(settings, paths)
    run_tool(f"3b. stage 2: continue at {settings.long_length} tokens, RoPE base "
             f"{settings.short_rotary_base} -> {settings.long_rotary_base}, "
             f"{settings.strategy} mixture", stage2_run(settings, paths).train_args())


# --------------------------------------------------------------------------------------------
# stage 4
# --------------------------------------------------------------------------------------------
#: (report key suffix, checkpoint) of the evaluations: before and after stage 2.
CHECKPOINTS = (("before", "stage1"), ("after", "stage2"))


def evaluate_needles(settings: DemoSettings, paths: DemoPaths) -> dict[str, Any]:
    """Stage 4a: the synthetic-fact needle at the long and the short length on both
    checkpoints (greedy, the answer within `NEEDLE_NEW_TOKENS` tokens), and the loss by
    position and domain on held-out documents of the stage-2 plan, in buckets that resolve
    both lengths (`position_bucket_edges`: 0, 32, 64, 128, 256, 512 at the defaults), drawn
    before and after stage 2 on one plot (eval/loss_by_position.png). The documents are those
    of at least the long length (`ppl_min_length`), so every bucket averages the same
    documents and the curve shows what context is worth, not which domains write long.

    Returns:
        ``needle_before``, ``needle_short_before``, ``needle_after``, ``needle_short_after``:
        the overall scores (0-100; None when the tool reports none);
        ``loss_by_position_before/after``: the buckets' start, end and mean loss;
        ``loss_by_position_documents``: the minimum length and documents per domain read.
    """
    scores: dict[str, Any] = {}
    edges = position_bucket_edges(settings.short_length, settings.long_length)
    min_length = ppl_min_length(settings, paths)
    for name, stage in CHECKPOINTS:
        training_length = settings.short_length if stage == "stage1" else settings.long_length
        for label, length in (("", settings.long_length), ("short_", settings.short_length)):
            target = paths.eval / f"needle_{stage}_{length}"
            run_tool(f"4. needle ({stage} checkpoint, {length} tokens, synthetic facts)",
                     ["tools/eval_needle.py", "--model", str(paths.checkpoints / stage),
                      "--tokenizer-model", str(paths.tokenizer),
                      "--needle-type", "synthetic-fact", "--lengths", str(length),
                      "--depths", str(settings.needle_depths),
                      "--max-new-tokens", str(NEEDLE_NEW_TOKENS),
                      "--training-length", str(training_length), "--output-dir", str(target)])
            results = json.loads((target / "results.json").read_text())
            scores[f"needle_{label}{name}"] = results["overall"]
        run_tool(f"4. loss by position and domain ({stage} checkpoint, held-out documents)",
                 ["tools/eval_ppl.py", "--model", str(paths.checkpoints / stage),
                  "--mixture-plan", str(paths.mixture / "mixture_plan.json"),
                  "--seq-length", str(settings.long_length),
                  "--max-docs-per-domain", str(DEMO_PPL_DOCS),
                  "--min-doc-length", str(min_length),
                  "--buckets", ",".join(map(str, edges[:-1])),
                  "--output-dir", str(paths.eval / f"ppl_{stage}")])
    curves = {f"{name} stage 2 ({stage})": json.loads(
        (paths.eval / f"ppl_{stage}" / PPL_RESULTS).read_text()) for name, stage in CHECKPOINTS}
    for (name, _), curve in zip(CHECKPOINTS, curves.values()):
        scores[f"loss_by_position_{name}"] = [
            {k: b[k] for k in ("start", "end", "loss")} for b in curve["buckets"]]
    scores["loss_by_position_documents"] = {
        "min_length": min_length,
        **{d: v["documents"] for d, v in next(iter(curves.values()))["domains"].items()}}
    plot_position_curves(curves, paths.eval / "loss_by_position.png",
                         marks=(settings.short_length,),
                         title=f"Loss by position, held-out documents of >= {min_length} "
                         "tokens, all domains")
    return scores


def ppl_min_length(settings: DemoSettings, paths: DemoPaths) -> int:
    """Shortest held-out document the loss by position reads: the long length when the
    stage-2 plan holds out such a document (the default corpus: ~40), else the short length
    (a reduced corpus may have none)."""
    from megatron_longctx.data.indexed import read_index
    from megatron_longctx.eval.ppl import sources_from_mixture_plan

    for source in sources_from_mixture_plan(paths.mixture / "mixture_plan.json"):
        lengths = read_index(source.prefix).document_lengths()
        if len(source.documents) and int(lengths[source.documents].max()) >= settings.long_length:
            return settings.long_length
    return settings.short_length


def ruler_scores(results_path: Path) -> tuple[float | None, dict[str, float | None]]:
    """(mean over tasks, score per task) of a tools/eval_ruler.py results.json (one length)."""
    results = json.loads(results_path.read_text())
    return results["overall"], dict(results["task_means"])


def evaluate_ruler(settings: DemoSettings, paths: DemoPaths) -> dict[str, Any]:
    """Stage 4b: the RULER subset (`--ruler-tasks`, `--ruler-samples` each) at the long length
    on both checkpoints, through tools/eval_ruler.py (eval/ruler.py's `run_ruler`; greedy,
    RULER's generation budgets and scoring). Nothing fits the short length: with the demo's
    tokenizer (a 4,096-type BPE of lowercase synthetic text) the smallest prompts take 137-345
    tokens for the niah tasks and ~400 for fwe, plus 128 / 50 new tokens; vt (920), cwe (~780)
    and json_kv (~485) do not fit 512 either.

    Returns:
        ``ruler_before`` / ``ruler_after`` (the mean over the tasks, 0-100) and
        ``ruler_by_task_before`` / ``ruler_by_task_after`` (per task); empty without tasks.
    """
    scores: dict[str, Any] = {}
    if not settings.ruler_tasks:
        return scores
    for name, stage in CHECKPOINTS:
        target = paths.eval / f"ruler_{stage}_{settings.long_length}"
        run_tool(f"4. RULER subset ({stage} checkpoint, {settings.long_length} tokens: "
                 f"{', '.join(settings.ruler_tasks)})",
                 ["tools/eval_ruler.py", "--model", str(paths.checkpoints / stage),
                  "--tokenizer-model", str(paths.tokenizer),
                  "--tasks", ",".join(settings.ruler_tasks),
                  "--lengths", str(settings.long_length),
                  "--num-samples", str(settings.ruler_samples), "--no-progress",
                  "--output-dir", str(target)])
        overall, by_task = ruler_scores(target / "results.json")
        scores[f"ruler_{name}"] = overall
        scores[f"ruler_by_task_{name}"] = by_task
    return scores


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def build_report(settings: DemoSettings, paths: DemoPaths,
                 scores: dict[str, Any]) -> dict[str, Any]:
    """report.json's contents: the scores, the settings, where the outputs are."""
    return {
        **scores,
        "settings": asdict(settings),
        "paths": {"checkpoints": str(paths.checkpoints), "tensorboard": str(paths.tensorboard),
                  "eval": str(paths.eval), "mixture_report": str(paths.mixture / "report.md")},
    }


def _fmt(score: float | None) -> str:
    return "n/a" if score is None else f"{score:.1f}"


def summary_lines(settings: DemoSettings, scores: dict[str, Any]) -> list[str]:
    """The result tables: the needle at both lengths, then the RULER subset (when run)."""
    s = settings
    lines = [
        "| needle score (0-100) | before stage 2 | after stage 2 |", "|---|---|---|",
        f"| {s.long_length} tokens | {_fmt(scores['needle_before'])} | "
        f"{_fmt(scores['needle_after'])} |",
        f"| {s.short_length} tokens | {_fmt(scores['needle_short_before'])} | "
        f"{_fmt(scores['needle_short_after'])} |",
    ]
    if "loss_by_position_before" in scores:
        docs = scores["loss_by_position_documents"]
        n = sum(v for k, v in docs.items() if k != "min_length")
        rows = {"before stage 2": scores["loss_by_position_before"],
                "after stage 2": scores["loss_by_position_after"]}
        head = next(iter(rows.values()))
        lines += ["", f"| loss by position ({n} held-out documents of >= {docs['min_length']} "
                  "tokens) | " + " | ".join(f"{b['start']}-{b['end']}" for b in head) + " |",
                  "|---|" + "---|" * len(head)]
        lines += [f"| {label} | " + " | ".join("n/a" if b["loss"] is None
                                               else f"{b['loss']:.3f}" for b in buckets)
                  + " |" for label, buckets in rows.items()]
    if "ruler_before" in scores:
        before, after = scores["ruler_by_task_before"], scores["ruler_by_task_after"]
        lines += ["", f"| RULER at {s.long_length} tokens (0-100) | before stage 2 | "
                  "after stage 2 |", "|---|---|---|"]
        lines += [f"| {task} | {_fmt(before.get(task))} | {_fmt(after.get(task))} |"
                  for task in s.ruler_tasks]
        lines.append(f"| mean | {_fmt(scores['ruler_before'])} | "
                     f"{_fmt(scores['ruler_after'])} |")
    return lines


def report_lines(settings: DemoSettings, scores: dict[str, Any]) -> list[str]:
    """report.md's lines: what ran, the result tables, where the plots are."""
    s = settings
    ruler = (f" RULER: {', '.join(s.ruler_tasks)} at {s.long_length} tokens, "
             f"{s.ruler_samples} samples each, RULER's prompts and scoring."
             if s.ruler_tasks else "")
    return [
        "# megatron-longctx demo", "",
        f"Stage 1: {s.model_preset} at {s.short_length} tokens, RoPE base "
        f"{s.short_rotary_base}, {s.stage1_iters} steps. Stage 2: {s.long_length} tokens, base "
        f"{s.long_rotary_base}, {s.stage2_iters} steps on the {s.strategy} mixture. Needle: "
        f"the synthetic-fact needle, {s.needle_depths} depths, greedy, the answer must be in "
        f"the first {NEEDLE_NEW_TOKENS} tokens.{ruler}", "",
        *summary_lines(settings, scores), "",
        "Heatmaps: eval/needle_*/heatmap.png; loss by position: eval/loss_by_position.png "
        "(both checkpoints; per domain: eval/ppl_*/loss_by_position.png); "
        "RULER: eval/ruler_*/results.md; mixture: mixture/report.md.",
    ]


def write_report(paths: DemoPaths, report: dict[str, Any], lines: list[str]) -> None:
    """Write report.json (indent 1, key order kept) and report.md, each atomically."""
    write_bytes_atomic(paths.root / "report.json",
                 (json.dumps(report, indent=1) + "\n").encode("utf-8"))
    write_bytes_atomic(paths.root / "report.md", ("\n".join(lines) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------------------------
# the whole demo
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoResult:
    """What `run_demo` produced: the report (as in report.json), report.md's lines and the
    result tables among them."""

    paths: DemoPaths
    report: dict[str, Any]
    lines: list[str]
    summary: list[str]


def run_demo(settings: DemoSettings, output_dir: str | os.PathLike[str]) -> DemoResult:
    """Run every stage into `output_dir` (created) and write the report.

    Args:
        settings: The validated settings.
        output_dir: Where everything goes (made absolute: the tools run in the repository).

    Returns:
        The report and report.md's lines.

    Raises:
        FileNotFoundError: the package is not inside a checkout with tools/.
        subprocess.CalledProcessError: a step failed (its output is above).
    """
    if not (REPO / "tools" / "make_corpus.py").is_file():
        raise FileNotFoundError(f"{REPO / 'tools'}: the demo runs the repository's tools; "
                                "run it from a checkout (pip install -e .)")
    paths = DemoPaths(Path(output_dir).resolve())
    prepare_data(settings, paths)
    print_dataset_table(paths)
    plan_mixtures(settings, paths)
    train_stages(settings, paths)
    scores = {**evaluate_needles(settings, paths), **evaluate_ruler(settings, paths)}
    report = build_report(settings, paths, scores)
    lines = report_lines(settings, scores)
    write_report(paths, report, lines)
    return DemoResult(paths, report, lines, summary_lines(settings, scores))
