"""RULER-style synthetic long-context suite: the run over tasks x lengths, shared-prefix KV
reuse, resumable results, markdown table and plot.

Tasks, templates, fitting to a length and scoring live in `ruler_tasks` (RULER's 13 tasks and
HELMET's JSON KV). This module runs them:

1. **Grid.** Cells are (task, length), task-major; each cell holds `num_samples` samples
   (RULER's default 500; index i of a cell is reproducible alone, see `ruler_tasks`).
2. **Generation.** Greedy, with the KV cache, at most the task's new tokens (RULER's
   `tokens_to_generate`: niah 128, vt 30, cwe 120, fwe 50, qa 32; json_kv 100 as HELMET),
   stopping at EOS. The prompt plus that budget fits the length.
3. **Shared-prefix reuse.** Consecutive prompts often start with the same tokens: the
   instruction and the haystack up to the first needle (niah essay / noise prompts of one
   length share everything before their first needle; all prompts of a task share the
   template's first sentence). The run generates with `CausalLM.generate(...,
   reuse_prefix=True)` (eval/models.py): the model's persistent KV cache keeps the longest
   common token prefix of a prompt with the previous sequence and prefills only the rest;
   exact up to the floating-point grouping of the prefill (the same kind of difference as
   another `--prefill-chunk`). The cache is sized once for the longest length
   (`reserve_cache`) and released at the end (`clear_cache`). Within a cell, samples are
   generated in groups of `REUSE_GROUP` sorted lexicographically by token ids, the order that
   maximises the summed common prefix of neighbours (a depth-first walk of their prefix trie).
   What it saves is measured by benchmarks/bench_ruler.py and recorded per sample
   (`reused_tokens`). Models that are not a `CausalLM` (test fakes, wrappers) get plain
   `generate(ids, n, use_cache=...)` calls.
4. **Score.** Per sample: RULER's `string_match_all` (fraction of references found) or
   `string_match_part` (any reference found), HELMET's `substring_exact_match` for json_kv,
   x100. Per cell: the mean over its samples. Per task: the mean over lengths. Per length and
   overall (the headline): the mean over the headline tasks (`headline`): RULER's 13 when
   all ran (QA files given), else the RULER tasks that ran, labelled with them and as not
   RULER's number in results.md, results.json (`headline`), the plot and the log; json_kv is
   reported but never averaged (it is HELMET's, not one of RULER's 13).
5. **Failures.** A cell whose prompts cannot be built (a length too short for the task, a
   word list too small) is recorded in `failed` with its error, shown as "failed" in
   results.md, and the other cells still run; the tool then exits 2. Errors of the model
   itself stop the run (results so far are saved).

Results (`results.json`, rewritten atomically after every cell, with `results.md` beside it;
`ruler.png` at the end) hold settings, the model, and every cell with its samples. A rerun
skips complete cells and finishes incomplete ones; other settings or another model stop the
run (`ResultsMismatchError`, from the needle tool).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_longctx.atomic import write_json_atomic, write_text_atomic
from megatron_longctx.eval.models import CausalLM
from megatron_longctx.eval.needle import (
    ResultsMismatchError,
    check_resumable,
    length_label,
    read_results,
)
from megatron_longctx.eval.ruler_tasks import (
    QA_TASKS,
    RULER_LENGTHS,
    RULER_TASKS,
    SYNTHETIC_TASKS,
    TASKS,
    SampleMaker,
    TaskResources,
    score_prediction,
)
from megatron_longctx.identity import content_sha256

FORMAT = "megatron-longctx-ruler/1"
RESULTS_NAME = "results.json"
TABLE_NAME = "results.md"
PLOT_NAME = "ruler.png"
#: Samples built, sorted and generated together (the reuse order is optimal within a group).
#: 32 prompts of 128K tokens are 16 MB of int32 ids.
REUSE_GROUP = 32

__all__ = ["RulerSettings", "ResultsMismatchError", "run_ruler", "plot_scores",
           "markdown_table"]


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------
@dataclass
class RulerSettings:
    """Everything a RULER run depends on (the CLI's flags).

    Attributes:
        tasks: task names (`--tasks`); default all synthetic tasks, plus qa_1 / qa_2 when
            their file is given. A QA task asked for without its file is skipped with a message.
        lengths: requested lengths in tokens, prompt + new tokens (`--lengths`; RULER's
            4K..128K by default).
        num_samples: samples per cell (`--num-samples`; RULER: 500).
        seed: seed of every generator (`--seed`; RULER: 42).
        haystack_file: essay haystack text, .txt/.jsonl file or directory
            (`--haystack-file`); None = the built-in prose.
        squad_file: SQuAD v2-format JSON for qa_1 (`--squad-file`).
        hotpotqa_file: HotpotQA-format JSON for qa_2 (`--hotpotqa-file`).
        max_new_tokens: one generation budget for every task (`--max-new-tokens`); None =
            each task's RULER default. Counted in the length either way.
        training_length: where the plot draws its line (`--training-length`); not part of the
            results' identity.
    """

    tasks: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=lambda: list(RULER_LENGTHS))
    num_samples: int = 500
    seed: int = 42
    haystack_file: str | None = None
    squad_file: str | None = None
    hotpotqa_file: str | None = None
    max_new_tokens: int | None = None
    training_length: int | None = field(default=None, compare=False)

    def validate(self) -> RulerSettings:
        """Check the flags together (ValueError names the flag); fill the default tasks."""
        if not self.lengths or any(int(x) < 1 for x in self.lengths):
            raise ValueError(f"--lengths must be positive token counts, got {self.lengths}")
        self.lengths = sorted({int(x) for x in self.lengths})
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        for flag, path in (("--haystack-file", self.haystack_file),
                           ("--squad-file", self.squad_file),
                           ("--hotpotqa-file", self.hotpotqa_file)):
            if path is not None and not Path(path).exists():
                raise ValueError(f"{flag} {path}: no such file or directory")
        if not self.tasks:
            self.tasks = list(SYNTHETIC_TASKS) + [
                t for t, f in zip(QA_TASKS, (self.squad_file, self.hotpotqa_file)) if f]
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"--tasks: unknown {unknown}; choose from {list(TASKS)}")
        self.tasks = list(dict.fromkeys(self.tasks))
        return self

    def skipped_tasks(self) -> dict[str, str]:
        """QA tasks asked for without their data file -> why they are skipped."""
        out = {}
        for task, path, flag in (("qa_1", self.squad_file, "--squad-file"),
                                 ("qa_2", self.hotpotqa_file, "--hotpotqa-file")):
            if task in self.tasks and not path:
                out[task] = (f"{task} needs an external dataset: pass {flag} (RULER uses "
                             f"{'SQuAD v2 dev' if task == 'qa_1' else 'HotpotQA dev'})")
        return out

    def run_tasks(self) -> list[str]:
        """The tasks that run (asked for, data present)."""
        skipped = self.skipped_tasks()
        return [t for t in self.tasks if t not in skipped]

    def new_tokens(self, task: str) -> int:
        """Generation budget of `task`."""
        return self.max_new_tokens or TASKS[task].max_new_tokens

    def identity(self) -> dict[str, Any]:
        """What every sample depends on: all but the grid, the sample count and the plot."""
        out = asdict(self)
        for name in ("tasks", "lengths", "num_samples", "training_length"):
            out.pop(name)
        for name in ("haystack_file", "squad_file", "hotpotqa_file"):
            if out[name]:
                out[name] = str(Path(out[name]).resolve())
            out[f"{name}_sha256"] = (content_sha256(out[name]) if out[name]
                                     and Path(out[name]).exists() else None)
        return out


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
def load_results(path: str | Path) -> dict[str, Any] | None:
    """A results.json written by `run_ruler`, or None when absent."""
    return read_results(path, FORMAT)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def headline(tasks: list[str]) -> dict[str, Any]:
    """Which tasks the headline mean averages, and its label.

    RULER's headline is the mean over its 13 tasks (QA included; json_kv, HELMET's, is not
    one of them). With all 13 run, that is the mean; otherwise the mean is over the RULER
    tasks that ran (all tasks when none is RULER's) and its label lists them and says it is
    not RULER's 13-task number (QA usually scores lowest, so a mean without it reads high).
    """
    ruler = [t for t in tasks if t in RULER_TASKS]
    if set(RULER_TASKS) <= set(tasks):
        return {"tasks": list(RULER_TASKS), "ruler_13": True,
                "label": "RULER 13-task mean"}
    averaged = ruler or list(tasks)
    missing = [t for t in RULER_TASKS if t not in averaged]
    label = (f"mean of {len(averaged)} tasks ({', '.join(averaged)}); not RULER's 13-task "
             f"mean: {', '.join(missing) if len(missing) <= 4 else f'{len(missing)} tasks'} "
             "not run")
    return {"tasks": averaged, "ruler_13": False, "label": label}


def summarize(cells: dict[tuple[str, int], dict[str, Any]], tasks: list[str],
              lengths: list[int], num_samples: int) -> dict[str, Any]:
    """Cell scores (mean of samples 0..num_samples-1), task means, and the length / overall
    means over the complete cells of the headline tasks (`headline`)."""
    table: dict[str, dict[str, float]] = {}
    done = []
    for task in tasks:
        for length in lengths:
            cell = cells.get((task, length))
            if cell is None:
                continue
            samples = [s for s in cell["samples"] if s["index"] < num_samples]
            if len(samples) < num_samples:
                continue
            score = float(np.mean([s["score"] for s in samples]))
            table.setdefault(task, {})[str(length)] = score
            done.append((task, length, score))
    head = headline(tasks)
    averaged = [(t, L, s) for t, L, s in done if t in head["tasks"]]
    return {
        "scores": table,
        "task_means": {t: _mean([s for tt, _, s in done if tt == t]) for t in tasks},
        "length_means": {str(L): _mean([s for _, LL, s in averaged if LL == L])
                         for L in lengths},
        "overall": _mean([s for _, _, s in averaged]),
        "headline": head,
        "cells_done": len(done), "cells_total": len(tasks) * len(lengths),
    }


def markdown_table(results: dict[str, Any]) -> str:
    """Tasks x lengths scores (one decimal), a mean column and a mean row; '-' = not done."""
    lengths = [int(x) for x in results["settings"]["lengths"]]
    tasks = results["settings"]["run_tasks"]
    scores = results.get("scores", {})

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    failed = {(f["task"], int(f["length"])) for f in results.get("failed", [])}
    averaged = results.get("headline", {}).get("tasks", tasks)
    head = "| task | " + " | ".join(length_label(L) for L in lengths) + " | mean |"
    rows = [head, "|---" * (len(lengths) + 2) + "|"]
    for task in tasks:
        cells = ["failed" if (task, L) in failed else fmt(scores.get(task, {}).get(str(L)))
                 for L in lengths]
        name = task if task in averaged else f"{task} (not averaged)"
        rows.append(f"| {name} | " + " | ".join(cells)
                    + f" | {fmt(results['task_means'].get(task))} |")
    rows.append("| **mean** | " + " | ".join(fmt(results["length_means"].get(str(L)))
                                            for L in lengths)
                + f" | **{fmt(results.get('overall'))}** |")
    label = results.get("headline", {}).get("label", "mean")
    lines = [f"RULER-style suite: {results['model'].get('path')}", "",
             f"**{label}: {fmt(results.get('overall'))}**", "", *rows, ""]
    lines.append(f"* mean row and column: {label}")
    lines.append(f"* essay haystack: {results['settings'].get('haystack_source')}")
    for f in results.get("failed", []):
        lines.append(f"* {f['task']} at {f['length']:,} tokens failed: {f['error']}")
    skipped = results["settings"].get("skipped_tasks") or {}
    for task, why in skipped.items():
        lines.append(f"* {task} skipped: {why}")
    training = results["settings"].get("training_length")
    if training:
        lines.append(f"* training length: {training:,} tokens")
    lines.append(f"* {results['cells_done']}/{results['cells_total']} cells, "
                 f"{results['settings']['num_samples']} samples each; means over the cells "
                 "done; scores 0-100 (RULER's string_match_all / string_match_part; json_kv: "
                 "HELMET's substring_exact_match)")
    return "\n".join(lines) + "\n"


def plot_scores(results: dict[str, Any], path: str | Path, *,
                training_length: int | None = None) -> Path:
    """Score vs length (log2 axis): one thin line per task, a thick black line for the mean
    over tasks, a dashed vertical line at the training length (outside the grid the legend
    says where it is instead)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [int(x) for x in results["settings"]["lengths"]]
    tasks = results["settings"]["run_tasks"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    cmap = plt.get_cmap("tab20")
    averaged = results.get("headline", {}).get("tasks", tasks)
    for i, task in enumerate(tasks):
        row = results.get("scores", {}).get(task, {})
        xs = [L for L in lengths if str(L) in row]
        if xs:
            ax.plot(xs, [row[str(L)] for L in xs], marker="o", markersize=3, linewidth=1,
                    color=cmap(i % 20),
                    label=task if task in averaged else f"{task} (not in the mean)")
    means = results.get("length_means", {})
    xs = [L for L in lengths if means.get(str(L)) is not None]
    head = results.get("headline", {})
    short = ("RULER 13-task mean" if head.get("ruler_13")
             else f"mean of {len(head.get('tasks', tasks))} tasks (not RULER's 13)")
    if xs:
        ax.plot(xs, [means[str(L)] for L in xs], color="black", linewidth=3, marker="o",
                label=short)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [length_label(L) for L in lengths])
    ax.minorticks_off()
    ax.set_ylim(-3, 103)
    ax.set_xlabel("length (tokens, prompt + generation)")
    ax.set_ylabel("score")
    if training_length is not None and lengths:
        if lengths[0] <= training_length <= lengths[-1]:
            ax.axvline(training_length, color="gray", linestyle="--", linewidth=1.5,
                       label=f"training length {training_length:,}")
        else:
            side = "above" if training_length > lengths[-1] else "below"
            ax.plot([], [], " ", label=f"training length {training_length:,} ({side} the grid)")
    overall = results.get("overall")
    name = Path(str(results.get("model", {}).get("path", "model"))).name
    ax.set_title(f"RULER-style suite: {name}\n{short}: "
                 f"{'n/a' if overall is None else f'{overall:.1f}'}; haystack: "
                 f"{str(results['settings'].get('haystack_source'))[:60]}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def _generate(model: Any, ids: list[int], max_new: int, *, use_cache: bool,
              reuse: bool) -> tuple[list[int], int]:
    """New token ids and the prompt tokens taken from the model's persistent cache."""
    if reuse:
        new = model.generate(ids, max_new, reuse_prefix=True)
        return list(new), model.last_reused_tokens
    return list(model.generate(ids, max_new, use_cache=use_cache)), 0


def run_ruler(model: Any, settings: RulerSettings, output_dir: str | Path, *,
              overwrite: bool = False, use_cache: bool = True, reuse_prefix: bool = True,
              plot: bool = True, progress: bool = True,
              log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run (or resume) the suite on `model`; write results.json, results.md and ruler.png.

    Args:
        model: a `CausalLM` (driver rank; the other ranks serve it, see `models.drive`) or
            any object with `tokenizer`, `generate(ids, n, use_cache=...)` and `describe()`
            (no prefix reuse then).
        settings: tasks, lengths, samples, seed, data files (validated here).
        output_dir: where the outputs go (created).
        overwrite: discard an existing results.json instead of resuming it.
        use_cache: KV-cache generation (False: full recompute per token; implies no reuse).
        reuse_prefix: keep one KV cache across prompts and reuse common prefixes
            (`CausalLM` models; released when the run ends).
        plot: write ruler.png at the end.
        progress: a tqdm bar over the samples to compute (stderr).
        log: progress lines (None: silent).

    Returns:
        The results dict (as written to results.json).

    Raises:
        ResultsMismatchError: results.json exists with other settings or another model.
        (A task that does not fit a requested length, or whose prompts fail to build, is
        listed in the results' `failed` instead.)
    """
    settings.validate()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_NAME
    description = model.describe()
    cells = _resumed_cells(path, settings, description, overwrite)
    skipped = settings.skipped_tasks()
    if log is not None:
        for why in skipped.values():
            log(f"skipped: {why}")
    tasks = settings.run_tasks()
    reuse = bool(reuse_prefix and use_cache and isinstance(model, CausalLM))
    resources = TaskResources.load(settings.haystack_file, settings.squad_file,
                                   settings.hotpotqa_file)
    if log is not None:
        log(f"essay haystack: {resources.essay_source}")
        log(f"headline: {headline(tasks)['label']}")
    state = _initial_state(settings, tasks, skipped, resources, reuse, description)
    state["failed"] = []
    run = _GridRun(model, settings, resources, cells, state, out, use_cache=use_cache,
                   reuse=reuse, log=log)
    todo = run.pending(tasks)
    done_before = len(tasks) * len(settings.lengths) - len(todo)
    run.execute(todo, progress=progress)
    if log is not None and done_before:
        log(f"{done_before} cells were already in {path}")
    if plot:
        plot_scores(state, out / PLOT_NAME, training_length=settings.training_length)
    return state


def _resumed_cells(path: Path, settings: RulerSettings, description: dict[str, Any],
                   overwrite: bool) -> dict[tuple[str, int], dict[str, Any]]:
    """The cells of an existing results.json made with the same settings and model."""
    results = None if overwrite else load_results(path)
    if results is None:
        return {}
    check_resumable(path, results, settings.identity(), description)
    return {(c["task"], int(c["length"])): c for c in results.get("cells", [])}


def _initial_state(settings: RulerSettings, tasks: list[str], skipped: dict[str, str],
                   resources: TaskResources, reuse: bool,
                   description: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "settings": {**settings.identity(), "tasks": settings.tasks, "run_tasks": tasks,
                     "lengths": settings.lengths, "num_samples": settings.num_samples,
                     "training_length": settings.training_length, "skipped_tasks": skipped,
                     "max_new_tokens_per_task": {t: settings.new_tokens(t) for t in tasks},
                     "metrics": {t: TASKS[t].metric for t in tasks},
                     "haystack_source": resources.essay_source,
                     "prefix_reuse": reuse},
        "model": description,
    }


class _GridRun:
    """The task x length grid of one run: computes missing samples cell by cell and saves
    results.json / results.md (atomically) after every cell, so a killed run resumes there."""

    def __init__(self, model: Any, settings: RulerSettings, resources: TaskResources,
                 cells: dict[tuple[str, int], dict[str, Any]], state: dict[str, Any],
                 out: Path, *, use_cache: bool, reuse: bool,
                 log: Callable[[str], None] | None) -> None:
        self.model, self.settings, self.resources = model, settings, resources
        self.cells, self.state, self.out = cells, state, out
        self.use_cache, self.reuse, self.log = use_cache, reuse, log
        self.bar: Any = None

    def pending(self, tasks: list[str]) -> list[tuple[str, int, list[int]]]:
        """(task, length, missing sample indices) of every unfinished cell, in grid order."""
        todo = []
        for task in tasks:
            for length in self.settings.lengths:
                have = {s["index"] for s in
                        self.cells.get((task, length), {}).get("samples", [])}
                missing = [i for i in range(self.settings.num_samples) if i not in have]
                if missing:
                    todo.append((task, length, missing))
        return todo

    def save(self) -> None:
        ordered = sorted(self.cells.values(), key=lambda c: (c["task"], c["length"]))
        self.state["cells"] = ordered
        self.state.update(summarize(self.cells, self.state["settings"]["run_tasks"],
                                    self.settings.lengths, self.settings.num_samples))
        write_json_atomic(self.out / RESULTS_NAME, self.state)
        write_text_atomic(self.out / TABLE_NAME, markdown_table(self.state))

    def execute(self, todo: list[tuple[str, int, list[int]]], *, progress: bool) -> None:
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=sum(len(m) for _, _, m in todo), unit="sample",
                            dynamic_ncols=True, desc="ruler")
        if self.reuse and todo:
            self.model.reserve_cache(max(self.settings.lengths))  # prompt + new <= length
        try:
            for task, length, missing in todo:
                self.run_cell(task, length, missing)
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.reuse:
                self.model.clear_cache()
        self.save()

    def fail(self, task: str, length: int, err: Exception) -> None:
        """Record a cell whose prompts could not be built (the other cells still run); a
        rerun tries it again."""
        error = f"{type(err).__name__}: {err}"
        self.state["failed"].append({"task": task, "length": length, "error": error})
        cell = self.cells.get((task, length))
        if cell is not None and not cell["samples"]:
            del self.cells[(task, length)]
        self.save()
        msg = f"{task} {length}: FAILED ({error}); the other cells go on"
        if self.bar is not None:
            self.bar.write(msg)
        elif self.log is not None:
            self.log(msg)

    def run_cell(self, task: str, length: int, missing: list[int]) -> None:
        spec = TASKS[task]
        max_new = self.settings.new_tokens(task)
        try:
            maker = SampleMaker(spec, length, max_new, self.model.tokenizer, self.resources,
                                self.settings.seed)
        except Exception as err:  # noqa: BLE001 (a task's own failure stops only its cell)
            self.fail(task, length, err)
            return
        cell = self.cells.setdefault((task, length), {
            "task": task, "length": length, "metric": spec.metric,
            "max_new_tokens": max_new, "samples": []})
        if self.bar is not None:
            self.bar.set_description(f"{task} {length_label(length)}")
        start = time.perf_counter()
        for g in range(0, len(missing), REUSE_GROUP):
            try:
                group = [maker.make(i) for i in missing[g:g + REUSE_GROUP]]
            except Exception as err:  # noqa: BLE001 (prompt building, not the model)
                self.fail(task, length, err)
                return
            if self.reuse:  # lexicographic order of ids: the best order for one cache
                group.sort(key=lambda s: s.ids)
            for sample in group:
                cell["samples"].append(self.run_sample(spec, sample, max_new))
                if self.bar is not None:
                    self.bar.update(1)
        cell["samples"].sort(key=lambda s: s["index"])
        cell["seconds"] = round(cell.get("seconds", 0.0) + time.perf_counter() - start, 3)
        self.save()
        self.report(task, length, cell)

    def run_sample(self, spec: Any, sample: Any, max_new: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        new_ids, reused = _generate(self.model, sample.ids, max_new,
                                    use_cache=self.use_cache, reuse=self.reuse)
        seconds = time.perf_counter() - t0
        response = self.model.tokenizer.decode(new_ids)
        return {"index": sample.index, "tokens": len(sample.ids), "units": sample.units,
                "answers": sample.answers, "response": response,
                "score": score_prediction(spec.metric, response, sample.answers),
                "generated_tokens": len(new_ids), "reused_tokens": reused,
                "seconds": round(seconds, 4)}

    def report(self, task: str, length: int, cell: dict[str, Any]) -> None:
        if self.log is None:
            return
        score = np.mean([s["score"] for s in cell["samples"]
                         if s["index"] < self.settings.num_samples])
        reused = sum(s["reused_tokens"] for s in cell["samples"])
        total = sum(s["tokens"] for s in cell["samples"])
        msg = (f"{task} {length}: score {score:.1f} ({len(cell['samples'])} samples, "
               f"{cell['seconds']:.1f} s, {100 * reused / max(total, 1):.0f}% of "
               "prompt tokens reused)")
        if self.bar is not None:
            self.bar.write(msg)
        else:
            self.log(msg)
