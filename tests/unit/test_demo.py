"""`make demo`'s driver end to end on a reduced corpus (the same tools and flags), and its
settings, flags and report writer without running anything."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longctx.config.flags import (
    FLAG_KEY,
    add_config_flags,
    config_from_namespace,
    flag_of,
)
from megatron_longctx.data.synthetic import CorpusConfig
from megatron_longctx.demo.pipeline import (
    DemoPaths,
    DemoSettings,
    build_report,
    report_lines,
    summary_lines,
    write_report,
)

REPO = Path(__file__).resolve().parents[2]


REDUCED_DEMO = ("--total-words", "400000", "--workers", "2", "--model-preset", "tiny",
                "--stage1-iters", "3", "--stage2-iters", "2", "--tokens-per-step", "1024",
                "--stage1-tokens-per-step", "512", "--short-length", "128",
                "--long-length", "512", "--needle-depths", "2",
                "--ruler-tasks", "niah_single_1,fwe", "--ruler-samples", "1")


def run_reduced_demo(out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py"), "--output-dir", str(out),
         *REDUCED_DEMO], capture_output=True, text=True, cwd=REPO, timeout=1800, env=env)


def _env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory):
    """The reduced demo, run once for the tests below, with 1 intra-op thread and AVX2 kernels
    asked for by the caller's environment (the demo pins its own; numerics.py)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    proc = run_reduced_demo(out, _env(OMP_NUM_THREADS="1", ATEN_CPU_CAPABILITY="avx2"))
    return out, proc


def test_reduced_demo_runs_end_to_end(reduced_demo):
    out, proc = reduced_demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max |diff|" in proc.stdout and ": OK" in proc.stdout
    # Stage 3 trained twice through the real trainer: stage 2 from stage 1's weights.
    from megatron_longctx.checkpoint import meta as checkpoint_meta

    for stage, iters, seq in (("stage1", 3, 128), ("stage2", 2, 512)):
        meta = checkpoint_meta.read_meta(
            checkpoint_meta.resolve_checkpoint(out / "checkpoints" / stage))
        assert meta["iteration"] == iters and meta["model"]["seq_length"] == seq
    assert "lm loss" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    for key in ("needle_before", "needle_after", "needle_short_before", "needle_short_after"):
        assert 0.0 <= report[key] <= 100.0
    assert report["settings"]["long_length"] == 512
    assert len(list((out / "eval").glob("needle_*/heatmap.png"))) == 4
    assert str(out / "report.md") in proc.stdout
    plan = json.loads((out / "mixture" / "mixture_plan.json").read_text())
    assert plan["strategy"] == "per-source" and len(plan["domains"]) == 7
    # Stage 1 trains on the natural mixture, stage 2 on the per-source one.
    plan1 = json.loads((out / "mixture_stage1" / "mixture_plan.json").read_text())
    assert plan1["strategy"] == "original"
    assert report["settings"]["strategy"] == "per-source"
    cells = json.loads((out / "eval" / "needle_stage1_512" / "results.json").read_text())
    assert cells["settings"]["max_new_tokens"] == 2 and len(cells["cells"]) == 2
    assert (out / "mixture" / "report.md").exists()
    # Loss by position in buckets that resolve both lengths, before and after on one plot.
    for stage in ("stage1", "stage2"):
        ppl = json.loads((out / "eval" / f"ppl_{stage}" / "ppl.json").read_text())
        assert ppl["settings"]["bucket_edges"] == [0, 64, 128, 256, 512]
    assert (out / "eval" / "loss_by_position.png").stat().st_size > 1000
    assert len(list((out / "data").glob("slimpajama_*_text_document.idx"))) == 7
    # The RULER subset ran on both checkpoints at the long length, one sample per task.
    for name, stage in (("before", "stage1"), ("after", "stage2")):
        assert 0.0 <= report[f"ruler_{name}"] <= 100.0
        assert set(report[f"ruler_by_task_{name}"]) == {"niah_single_1", "fwe"}
        ruler = json.loads((out / "eval" / f"ruler_{stage}_512" / "results.json").read_text())
        assert ruler["settings"]["lengths"] == [512] and ruler["cells_done"] == 2
    assert "| RULER at 512 tokens" in proc.stdout
    assert not list(out.glob(".report*"))  # no temporary file left behind


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            key = f"{events.parent.relative_to(logdir)}:{tag}"
            out.setdefault(key, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_same_numbers_with_other_thread_and_kernel_settings(reduced_demo, tmp_path):
    """A second run whose caller asks for other numerics (2 threads, the widest kernels): the
    same stage-1 and stage-2 loss curves bit for bit and the same needle answers. Unpinned, one
    thread against two changes the per-domain losses from the first step (ATen splits the
    reductions per thread), which 1,000 steps turn into other needle scores across machines."""
    first, proc = reduced_demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = tmp_path / "demo"
    proc = run_reduced_demo(second, _env(OMP_NUM_THREADS="2", ATEN_CPU_CAPABILITY=None,
                                         MKL_NUM_THREADS=None))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _scalars(first / "tensorboard"), _scalars(second / "tensorboard")
    losses = [k for k in a if "loss" in k and "iteration-time" not in k]
    assert any(k.startswith("stage1") for k in losses), sorted(a)
    for key in losses:
        assert a[key] == b[key], key
    for cells in sorted((first / "eval").glob("needle_*/results.json")):
        other = second / "eval" / cells.parent.name / "results.json"
        answers = [c.get("response") for c in json.loads(cells.read_text())["cells"]]
        assert answers == [c.get("response") for c in json.loads(other.read_text())["cells"]]
        assert all(r is not None for r in answers)


def test_pinned_environment_reexecutes_once():
    from megatron_longctx.demo import numerics

    env = {"OMP_NUM_THREADS": "1"}
    assert numerics.needs_reexec(env)
    pinned = numerics.pinned_env(env)
    assert pinned["OMP_NUM_THREADS"] == "2" and not numerics.needs_reexec(pinned)
    assert not numerics.needs_reexec({numerics.OPT_OUT: "1"})
    # What the tools see after the re-exec: torch runs with the pinned thread count.
    code = "import torch; print(torch.get_num_threads())"
    proc = subprocess.run(
        [sys.executable, "-c", "from megatron_longctx.demo.numerics import reexec_pinned; "
         f"reexec_pinned(['-c', {code!r}])"], capture_output=True, text=True, cwd=REPO,
        env=_env(OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "2", proc.stderr


def _parser(cls: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, cls)
    return parser


@pytest.mark.parametrize("cls", [DemoSettings, CorpusConfig])
def test_flags_come_from_the_dataclass(cls):
    """Every field has its flag, no flag restates a default: parsing nothing gives the
    dataclass's defaults, and each flag sets its field."""
    parser = _parser(cls)
    usage = parser.format_usage()
    for field in dataclasses.fields(cls):
        assert f"[{flag_of(field)} " in usage, field.name
        assert field.metadata[FLAG_KEY].help, field.name
    assert config_from_namespace(cls, parser.parse_args([])) == cls()
    assert config_from_namespace(cls, parser.parse_args(["--seed" if cls is CorpusConfig else
                                                      "--stage2-iters", "7"])) != cls()


def test_demo_flags_parse_types():
    parser = _parser(DemoSettings)
    settings = config_from_namespace(DemoSettings, parser.parse_args(
        ["--long-fraction", "0.5", "--ruler-tasks", "fwe, niah_single_2", "--workers", "3"]))
    assert (settings.long_fraction, settings.ruler_tasks, settings.workers) == (
        0.5, ("fwe", "niah_single_2"), 3)
    assert config_from_namespace(DemoSettings, parser.parse_args(
        ["--ruler-tasks", "none"])).ruler_tasks == ()


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"total_words": 0}, "--total-words"),
        ({"workers": 0}, "--workers"),
        ({"stage1_iters": 0}, "--stage1-iters"),
        ({"needle_depths": 1.5}, "--needle-depths"),
        ({"long_length": 64}, "--long-length"),
        ({"model_preset": "nope"}, "--model-preset"),
        ({"strategy": "nope"}, "--strategy"),
        ({"long_fraction": 1.0}, "--long-fraction"),
        ({"ruler_tasks": ("qa_1",)}, "--ruler-tasks"),
        ({"ruler_samples": 0}, "--ruler-samples"),
    ],
)
def test_settings_validation_names_the_flag(changes, flag):
    with pytest.raises(ValueError, match=re.escape(flag)):
        DemoSettings(**changes)


def test_bad_flag_exits_2_naming_it():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py"), "--short-length", "512"],
        capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "--long-length must be > --short-length" in proc.stderr


def test_report_files(tmp_path):
    """report.json keeps its key order (scores, settings, paths); report.md has both tables;
    both are written through a temporary file that does not stay behind."""
    settings = DemoSettings(workers=2, ruler_tasks=("niah_single_1", "fwe"))
    scores = {"needle_before": 0.0, "needle_short_before": 95.0, "needle_after": 95.0,
              "needle_short_after": 100.0, "ruler_before": 0.0, "ruler_after": 12.5,
              "ruler_by_task_before": {"niah_single_1": 0.0, "fwe": 0.0},
              "ruler_by_task_after": {"niah_single_1": 0.0, "fwe": 25.0}}
    paths = DemoPaths(tmp_path)
    report = build_report(settings, paths, scores)
    write_report(paths, report, report_lines(settings, scores))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
    text = (tmp_path / "report.json").read_text()
    assert text == json.dumps(report, indent=1) + "\n"
    loaded = json.loads(text)
    assert list(loaded)[:4] == ["needle_before", "needle_short_before", "needle_after",
                                "needle_short_after"]
    assert list(loaded)[-2:] == ["settings", "paths"]
    assert list(loaded["settings"])[:3] == ["total_words", "workers", "model_preset"]
    md = (tmp_path / "report.md").read_text()
    assert "| 512 tokens | 0.0 | 95.0 |" in md and "| 64 tokens | 95.0 | 100.0 |" in md
    assert "| fwe | 0.0 | 25.0 |" in md and "| mean | 0.0 | 12.5 |" in md
    assert summary_lines(settings, scores)[0].startswith("| needle score")
    no_ruler = {k: v for k, v in scores.items() if not k.startswith("ruler")}
    assert "RULER" not in "\n".join(summary_lines(settings, no_ruler))
