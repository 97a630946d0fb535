"""`make ablation` (the stage-2 mixture comparison) end to end on a reduced corpus, resumed and
rerun for equal numbers; its settings, tables, plots and input errors without training."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_longctx.demo.ablation import (
    ABLATION_STRATEGIES,
    AblationPaths,
    AblationSettings,
    auto_upsample_domains,
    claim_output_dir,
    loss_split,
    report_lines,
    summary_lines,
    table_rows,
    write_plots,
)
from megatron_longctx.demo.plots import position_bucket_edges

REPO = Path(__file__).resolve().parents[2]
#: The reduced run: 400K words, the tiny preset, 3 stage-1 steps, 2 stage-2 steps x 2 samples
#: at 512 tokens per strategy, 2 needle depths (~100 s on 2 idle cores).
REDUCED = ["--total-words", "400000", "--workers", "2", "--model-preset", "tiny",
           "--stage1-iters", "3", "--stage2-iters", "2", "--tokens-per-step", "1024",
           "--stage1-tokens-per-step", "512", "--short-length", "128", "--long-length", "512",
           "--needle-depths", "2"]


def _demo_ablation(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py"), "--ablation", "--output-dir",
         str(out), *REDUCED, *extra], capture_output=True, text=True, cwd=REPO, timeout=900)


def test_reduced_ablation_end_to_end_resumes_and_reruns_equal(tmp_path):
    from megatron_longctx.checkpoint import meta as checkpoint_meta

    out = tmp_path / "ablation"
    proc = _demo_ablation(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[ablation 5/5] cut" in proc.stdout and "| stage-2 mixture |" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert list(results["strategies"]) == list(ABLATION_STRATEGIES)
    assert results["stage2_tokens_per_strategy"] == 2 * 2 * 512
    for name, r in results["strategies"].items():
        # Equal tokens from one start: 2 steps x 2 samples at 512 from the stage-1 checkpoint.
        meta = checkpoint_meta.read_meta(checkpoint_meta.resolve_checkpoint(
            out / "strategies" / name / "checkpoint"))
        assert meta["iteration"] == 2 and meta["model"]["seq_length"] == 512, name
        plan = json.loads((out / "strategies" / name / "mixture" / "mixture_plan.json")
                          .read_text())
        assert plan["strategy"] == name
        # The shares come from the index the trainer built (no new index file for the audit).
        real = r["realized"]
        assert real["index_from_trainer_cache"] and real["samples"] == 4, name
        assert real["max_document_repeats"] == max(
            real["max_document_repeats_by_domain"].values()) > 0, name
        assert sum(real["domain_shares"].values()) == pytest.approx(1.0)
        assert 0.0 <= r["needle"] <= 100.0
        assert [b["start"] for b in r["buckets"]] == [0, 64, 128, 256]
    assert results["strategies"]["cut"]["realized"]["long_share"] == 0.0
    assert (results["strategies"]["per-source"]["realized"]["long_share"]
            > results["strategies"]["original"]["realized"]["long_share"])
    cut_plan = json.loads((out / "strategies/cut/mixture/mixture_plan.json").read_text())
    assert cut_plan["cut_length"] == 128
    assert set(results["upsample_domains"]) >= {"RedPajamaArXiv", "RedPajamaBook"}
    assert results["table"]["original"]["delta_long"]["all"] == 0.0
    report = (out / "report.md").read_text()
    assert "| per-source |" in report and "Realised domain shares" in report
    for plot in ("loss_by_position", "domain_loss_delta", "domain_shares"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000
    assert not list(out.rglob("*.tmp-*"))

    # A killed strategy (no result.json) is redone from scratch, the others are skipped, and
    # the rerun gives the same numbers (same seed: CPU training and evaluation are exact).
    done = json.loads((out / "strategies/per-source/result.json").read_text())
    (out / "strategies/per-source/result.json").unlink()
    (out / "strategies/per-source/partial").write_text("left by a killed run")
    again = _demo_ablation(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage 1: reusing" in again.stdout and "original: done before" in again.stdout
    assert again.stdout.count("== stage 2 (") == 1
    redone = json.loads((out / "strategies/per-source/result.json").read_text())
    for key in ("needle", "needle_cells", "loss", "buckets", "realized", "documents"):
        assert redone[key] == done[key], key
    assert not (out / "strategies/per-source/partial").exists()
    # Other demo settings in the same directory are refused (exit 2, one line).
    other = _demo_ablation(out, "--long-fraction", "0.8")
    assert other.returncode == 2 and "other demo settings" in other.stderr
    assert "Traceback" not in other.stderr


def test_position_bucket_edges_resolve_both_lengths():
    assert position_bucket_edges(64, 512) == [0, 32, 64, 128, 256, 512]
    assert position_bucket_edges(128, 512) == [0, 64, 128, 256, 512]
    assert position_bucket_edges(4096, 131072)[:3] == [0, 2048, 4096]
    assert position_bucket_edges(4096, 131072)[-1] == 131072
    assert position_bucket_edges(64, 100) == [0, 32, 64, 100]
    with pytest.raises(ValueError):
        position_bucket_edges(512, 512)


def test_loss_split_is_token_weighted():
    buckets = [{"start": 0, "end": 32, "tokens": 31, "loss": 2.0},
               {"start": 32, "end": 64, "tokens": 32, "loss": 1.0},
               {"start": 64, "end": 128, "tokens": 10, "loss": 3.0},
               {"start": 128, "end": 512, "tokens": 0, "loss": None}]
    split = loss_split(buckets, 64)
    assert split["short"] == pytest.approx((62 + 32) / 63)
    assert split["long"] == pytest.approx(3.0)
    assert loss_split(buckets[:2], 64)["long"] is None


def _settings(**changes) -> AblationSettings:
    given = {"data_prefix": ("data/x_*",), "stage1_checkpoint": "ckpt",
             "tokenizer_model": "tok", **changes}
    return AblationSettings(**given)


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"stage2_iters": 0}, "--stage2-iters"),
        ({"long_length": 64}, "--long-length"),
        ({"strategies": ("original", "nope")}, "--strategies"),
        ({"strategies": ("cut", "cut")}, "--strategies"),
        ({"long_fraction": 1.0}, "--long-fraction"),
        ({"valid_fraction": 0.0}, "--valid-fraction"),
        ({"upweight_factor": 0.0}, "--upweight-factor"),
        ({"model_preset": "nope"}, "--model-preset"),
        ({"data_prefix": ()}, "--data-prefix"),
    ],
)
def test_settings_validation_names_the_flag(changes, flag):
    with pytest.raises(ValueError, match=re.escape(flag)):
        _settings(**changes)


def _fake_result(shares: dict[str, float], long_share: float, losses: dict[str, tuple],
                 needle: float) -> dict:
    weights = {"A": 0.5, "B": 0.5}
    return {"needle": needle, "documents": {"A": 1, "B": 1},
            "buckets": [{"start": 0, "end": 32, "label": "0-32", "tokens": 31, "loss": 2.0},
                        {"start": 32, "end": 64, "label": "32-64", "tokens": 32, "loss": 1.5}],
            "loss": {d: {"short": s, "long": lo} for d, (s, lo) in losses.items()},
            "realized": {"domain_shares": shares, "long_share": long_share,
                         "target_domain_weights": weights, "max_document_repeats": 2.5}}


def _fake_results() -> dict:
    strategies = {
        "original": _fake_result({"A": 0.5, "B": 0.5}, 0.2,
                                 {"A": (2.0, 3.0), "B": (1.0, 2.0), "all": (1.5, 2.5)}, 40.0),
        "global": _fake_result({"A": 0.8, "B": 0.2}, 0.9,
                               {"A": (1.9, 2.5), "B": (1.2, 2.4), "all": (1.6, 2.45)}, 90.0),
    }
    stage1 = _fake_result({}, 0.0, {"all": (1.4, 3.5)}, 5.0)
    return {"table": table_rows(strategies), "strategies": strategies, "stage1": stage1,
            "upsample_domains": ["A"], "stage2_tokens_per_strategy": 1024}


def test_table_deltas_drift_and_report():
    results = _fake_results()
    # domain-upsample's own targets include its upweighting: drift is against the reference's.
    upsampled = _fake_result({"A": 0.75, "B": 0.25}, 0.3,
                             {"A": (2.0, 3.0), "B": (1.0, 2.0), "all": (1.5, 2.5)}, 50.0)
    upsampled["realized"]["target_domain_weights"] = {"A": 0.75, "B": 0.25}
    drift = table_rows({**results["strategies"], "domain-upsample": upsampled})
    assert drift["domain-upsample"]["domain_drift"] == pytest.approx(0.25)
    row = results["table"]["global"]
    assert row["delta_long"]["A"] == pytest.approx(-0.5)
    assert row["delta_short"]["B"] == pytest.approx(0.2)
    assert row["domain_drift"] == pytest.approx(0.3)  # total variation vs the target weights
    assert row["largest_shift"]["domain"] in ("A", "B")
    assert abs(row["largest_shift"]["change"]) == pytest.approx(0.3)
    assert results["table"]["original"]["delta_long"]["all"] == 0.0
    settings = _settings(strategies=("original", "global"))
    lines = summary_lines(settings, results)
    assert any(line.startswith("| global | 90.0 | 90.0% | 2.5x | 30.0% |") for line in lines)
    assert any("| original | 40.0 | 20.0% | 2.5x | 0.0% |" in line and "(abs)" in line
               for line in lines)
    md = "\n".join(report_lines(settings, results))
    assert "| global | -0.500 | +0.400 | -0.050 |" in md  # long positions: A, B, all
    # Without the reference the deltas are n/a, not zero.
    del results["strategies"]["original"]
    results["table"] = table_rows(results["strategies"])
    assert results["table"]["global"]["delta_long"]["A"] is None


def test_plots_written(tmp_path):
    results = _fake_results()
    paths = AblationPaths(tmp_path)
    write_plots(_settings(), paths, results)
    for name in ("loss_by_position", "domain_loss_delta", "domain_shares"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_other_settings_refused(tmp_path):
    paths = AblationPaths(tmp_path / "out")
    claim_output_dir(_settings(), paths)
    claim_output_dir(_settings(), paths)  # same settings: resumes
    with pytest.raises(ValueError, match=r"other settings \(stage2_iters\)"):
        claim_output_dir(_settings(stage2_iters=7), paths)


def test_auto_upsample_domains_are_the_long_document_ones(tmp_path):
    from tests.unit.mixture_fixtures import make_slimpajama_like

    prefixes = make_slimpajama_like(tmp_path, total_tokens=400_000)
    chosen = auto_upsample_domains([str(p) for p in prefixes], 4096)
    assert {"RedPajamaBook", "RedPajamaArXiv"} <= set(chosen)
    assert "RedPajamaC4" not in chosen


def test_tool_bad_input_exits_2_naming_the_flag(tmp_path):
    tool = str(REPO / "tools" / "ablate_mixture.py")
    base = ["--output-dir", str(tmp_path / "o"), "--stage1-checkpoint", str(tmp_path),
            "--tokenizer-model", str(tmp_path)]
    proc = subprocess.run([sys.executable, tool, *base, "--data-prefix",
                           str(tmp_path / "none_*")], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "--data-prefix" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, tool, *base, "--data-prefix", "x",
                           "--strategies", "original,bogus"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "--strategies" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_flags_cover_every_setting():
    import argparse

    from megatron_longctx.config.flags import add_config_flags, config_from_namespace

    parser = argparse.ArgumentParser()
    add_config_flags(parser, AblationSettings)
    required = ["--data-prefix", "a,b", "--stage1-checkpoint", "c", "--tokenizer-model", "t"]
    settings = config_from_namespace(AblationSettings, parser.parse_args(required))
    assert settings == AblationSettings(data_prefix=("a", "b"), stage1_checkpoint="c",
                                        tokenizer_model="t")
    assert settings.strategies == ABLATION_STRATEGIES
    parsed = config_from_namespace(AblationSettings, parser.parse_args(
        [*required, "--strategies", "cut, original", "--upsample-domains", "Book"]))
    assert parsed.strategies == ("cut", "original") and parsed.upsample_domains == ("Book",)
    assert np.isclose(parsed.long_fraction, 0.9)
