"""`make ablation` (the stage-2 mixture comparison, arms x seeds) end to end on a reduced corpus,
resumed and rerun for equal numbers; its settings, aggregation over seeds, tables, plots and
input errors without training."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_longctx.demo.ablation import (
    ABLATION_ARMS,
    AblationPaths,
    AblationSettings,
    aggregate,
    arm_config,
    auto_upsample_domains,
    build_results,
    claim_output_dir,
    loss_split,
    pairwise_lines,
    report_lines,
    summary_lines,
    table_rows,
    write_plots,
)
from megatron_longctx.demo.plots import position_bucket_edges

REPO = Path(__file__).resolve().parents[2]
#: The reduced run: 400K words, the tiny preset, 3 stage-1 steps, 2 stage-2 steps x 2 samples
#: at 512 tokens per arm, 3 needle lengths x 2 depths, 3 arms x 2 seeds (the test with its
#: resume and refusal: ~3 min on 2 shared cores).
REDUCED = ["--total-words", "400000", "--workers", "2", "--model-preset", "tiny",
           "--stage1-iters", "3", "--stage2-iters", "2", "--tokens-per-step", "1024",
           "--stage1-tokens-per-step", "512", "--short-length", "128", "--long-length", "512",
           "--needle-depths", "2", "--seeds", "2", "--strategies", "original,per-source,cut"]
ARMS_RUN = ("original", "per-source", "cut")


def _demo_ablation(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py"), "--ablation", "--output-dir",
         str(out), *REDUCED, *extra], capture_output=True, text=True, cwd=REPO, timeout=900)


def test_reduced_ablation_end_to_end_resumes_and_reruns_equal(tmp_path):
    from megatron_longctx.checkpoint import meta as checkpoint_meta

    out = tmp_path / "ablation"
    proc = _demo_ablation(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[ablation 6/6] seed 1235 (2/2), arm 3/3: cut" in proc.stdout
    assert "| arm | needle at 256,384,512, mean [95% CI] |" in proc.stdout
    assert "- per-source vs cut: needle " in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["seed_list"] == [1234, 1235] and list(results["seeds"]) == ["1234", "1235"]
    assert list(results["summary"]["arms"]) == list(ARMS_RUN)
    assert results["needle_lengths"] == [256, 384, 512]
    assert results["stage2_tokens_per_strategy"] == 2 * 2 * 512
    assert results["arms"]["per-source"] == {"strategy": "per-source",
                                             "parameters": {"short_keep_ratio": 0.1}}
    needles = {}
    for seed in ("1234", "1235"):
        run = results["seeds"][seed]
        assert run["stage1"]["needle_by_length"].keys() == {"256", "384", "512"}
        for name, r in run["strategies"].items():
            root = out / "seeds" / seed / "strategies" / name
            # Equal tokens from one start: 2 steps x 2 samples at 512 from the stage-1 weights.
            meta = checkpoint_meta.read_meta(checkpoint_meta.resolve_checkpoint(
                root / "checkpoint"))
            assert meta["iteration"] == 2 and meta["model"]["seq_length"] == 512, name
            plan = json.loads((root / "mixture" / "mixture_plan.json").read_text())
            assert plan["strategy"] == name and r["seed"] == int(seed), name
            assert plan["parameters"]["seed"] == int(seed), name
            assert "long_document_buckets" in r, name  # None without full-length documents
            # The shares come from the index the trainer built (no new index file).
            real = r["realized"]
            assert real["index_from_trainer_cache"] and real["samples"] == 4, name
            assert real["max_document_repeats"] == max(
                real["max_document_repeats_by_domain"].values()) > 0, name
            assert sum(real["domain_shares"].values()) == pytest.approx(1.0)
            # 3 lengths x 2 depths; the score is the mean of the per-length means.
            assert len(r["needle_cells"]) == 6 and 0.0 <= r["needle"] <= 100.0
            assert r["needle"] == pytest.approx(np.mean(list(r["needle_by_length"].values())))
            assert [b["start"] for b in r["buckets"]] == [0, 64, 128, 256]
        details = run["strategies"]["per-source"]["plan"]["details"]
        assert details["short_keep_ratio"] == 0.1 and "long_fraction" not in details
        assert run["strategies"]["cut"]["realized"]["long_share"] == 0.0
        assert (run["strategies"]["per-source"]["realized"]["long_share"]
                > run["strategies"]["original"]["realized"]["long_share"])
        assert run["table"]["original"]["delta_long"]["all"] == 0.0
        needles[seed] = run["strategies"]["per-source"]["needle"]
    summary = results["summary"]
    assert summary["arms"]["per-source"]["needle"]["mean"] == pytest.approx(
        np.mean(list(needles.values())))
    assert summary["arms"]["per-source"]["needle"]["n"] == 2
    assert set(summary["pairwise"]) == {"original", "cut"}
    assert summary["pairwise"]["cut"]["needle"]["seeds"] == ["1234", "1235"]
    report = (out / "report.md").read_text()
    assert "| per-source |" in report and "Realised domain shares" in report
    assert re.search(r"- per-source vs original: needle [+-]\d+\.\d \[", report)
    assert "## Needle by length" in report
    for plot in ("loss_by_position", "domain_loss_delta", "domain_shares"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000
    assert not list(out.rglob("*.tmp-*"))

    # A killed arm (no result.json) is redone from scratch, the others are skipped, and the
    # rerun gives the same numbers (same seed: CPU training and evaluation are exact).
    arm_dir = out / "seeds/1235/strategies/per-source"
    done = json.loads((arm_dir / "result.json").read_text())
    (arm_dir / "result.json").unlink()
    (arm_dir / "partial").write_text("left by a killed run")
    again = _demo_ablation(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage 1: reusing" in again.stdout
    assert "seed 1234 (1/2), arm 1/3: original: done before" in again.stdout
    assert again.stdout.count("== stage 2 (") == 1 and "[ablation 1/1]" in again.stdout
    redone = json.loads((arm_dir / "result.json").read_text())
    for key in ("needle", "needle_by_length", "needle_cells", "loss", "buckets", "realized",
                "documents", "plan"):
        assert redone[key] == done[key], key
    assert not (arm_dir / "partial").exists()
    assert json.loads((out / "results.json").read_text())["summary"] == summary
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
        ({"seeds": 0}, "--seeds"),
        ({"short_keep_ratio": 0.0}, "--short-keep-ratio"),
        ({"short_keep_ratio": 1.5}, "--short-keep-ratio"),
        ({"needle_lengths": (256, 1024)}, "--needle-lengths"),
        ({"needle_lengths": (0,)}, "--needle-lengths"),
        ({"needle_lengths": (256, 256)}, "--needle-lengths"),
    ],
)
def test_settings_validation_names_the_flag(changes, flag):
    with pytest.raises(ValueError, match=re.escape(flag)):
        _settings(**changes)


def test_arms_seeds_and_needle_lengths():
    settings = _settings(seed=7, seeds=3)
    assert settings.seed_list == [7, 8, 9]
    assert settings.strategies == ABLATION_ARMS == (
        "original", "per-source", "per-source-target", "global", "domain-upsample", "cut")
    assert settings.needle_length_grid == [256, 384, 512]
    assert _settings(long_length=100).needle_length_grid == [50, 75, 100]
    assert _settings(needle_lengths=(512, 128)).needle_length_grid == [128, 512]
    assert _settings(short_keep_ratio=1.0).short_keep_ratio == 1.0


@pytest.mark.parametrize(
    ("arm", "strategy", "details"),
    [
        ("per-source", "per-source", {"short_keep_ratio": 0.1}),
        ("per-source-target", "per-source", {"long_fraction": 0.9}),
        ("global", "global", {"short_keep_ratio": 0.1, "global_short_keep_ratio": 0.1}),
    ],
)
def test_arm_plans_record_their_rule(tmp_path, arm, strategy, details):
    """The released rule (keep ratio 0.1) and the paper's stated target (long fraction 0.9)
    are different arms; the plan's details record which one it ran."""
    from megatron_longctx.mixture.planner import plan_mixture
    from tests.unit.mixture_fixtures import make_slimpajama_like

    prefixes = [str(p) for p in make_slimpajama_like(tmp_path, total_tokens=400_000)]
    cfg = arm_config(_settings(seed=1235), arm, prefixes, tmp_path / "plan", [])
    plan = plan_mixture(cfg)
    assert plan.strategy == strategy and plan.seed == 1235
    assert plan.details == details


def _fake_result(shares: dict[str, float], long_share: float, losses: dict[str, tuple],
                 needle: float) -> dict:
    weights = {"A": 0.5, "B": 0.5}
    return {"needle": needle, "needle_by_length": {"256": needle + 10, "512": needle - 10},
            "documents": {"A": 1, "B": 1},
            "buckets": [{"start": 0, "end": 32, "label": "0-32", "tokens": 31, "loss": 2.0},
                        {"start": 32, "end": 64, "label": "32-64", "tokens": 32, "loss": 1.5}],
            "loss": {d: {"short": s, "long": lo} for d, (s, lo) in losses.items()},
            "realized": {"domain_shares": shares, "long_share": long_share,
                         "target_domain_weights": weights, "max_document_repeats": 2.5},
            "seconds": 1.0}


def _fake_strategies() -> dict:
    return {
        "original": _fake_result({"A": 0.5, "B": 0.5}, 0.2,
                                 {"A": (2.0, 3.0), "B": (1.0, 2.0), "all": (1.5, 2.5)}, 40.0),
        "global": _fake_result({"A": 0.8, "B": 0.2}, 0.9,
                               {"A": (1.9, 2.5), "B": (1.2, 2.4), "all": (1.6, 2.45)}, 90.0),
    }


def _fake_runs(needles: dict[str, list[float]], long_all: dict[str, list[float]]) -> dict:
    """Seeds "1", "2", "3": the fake arms with the given needle and loss-beyond-the-window
    (all domains) per seed."""
    runs = {}
    for k, seed in enumerate(("1", "2", "3")):
        strategies = {}
        for arm in needles:
            r = _fake_result({"A": 0.5, "B": 0.5}, 0.2 + 0.1 * k,
                             {"A": (2.0, 3.0), "B": (1.0, 2.0), "all": (1.5, long_all[arm][k])},
                             needles[arm][k])
            r["realized"]["max_document_repeats"] = 1.0 + k
            strategies[arm] = r
        stage1 = _fake_result({}, 0.0, {"all": (1.4, 3.5)}, 5.0 + k)
        runs[seed] = {"stage1": stage1, "strategies": strategies,
                      "table": table_rows(strategies)}
    return runs


def _fake_results(runs: dict | None = None, arms=("original", "global")) -> dict:
    if runs is None:
        runs = {"1234": {"stage1": _fake_result({}, 0.0, {"all": (1.4, 3.5)}, 5.0),
                         "strategies": _fake_strategies()}}
        runs["1234"]["table"] = table_rows(runs["1234"]["strategies"])
    settings = _settings(strategies=tuple(arms), needle_lengths=(256, 512), seeds=len(runs))
    return build_results(settings, ["A"], runs)


def test_table_deltas_drift_and_report_one_seed():
    strategies = _fake_strategies()
    # domain-upsample's own targets include its upweighting: drift is against the reference's.
    upsampled = _fake_result({"A": 0.75, "B": 0.25}, 0.3,
                             {"A": (2.0, 3.0), "B": (1.0, 2.0), "all": (1.5, 2.5)}, 50.0)
    upsampled["realized"]["target_domain_weights"] = {"A": 0.75, "B": 0.25}
    drift = table_rows({**strategies, "domain-upsample": upsampled})
    assert drift["domain-upsample"]["domain_drift"] == pytest.approx(0.25)
    table = table_rows(strategies)
    row = table["global"]
    assert row["delta_long"]["A"] == pytest.approx(-0.5)
    assert row["delta_short"]["B"] == pytest.approx(0.2)
    assert row["domain_drift"] == pytest.approx(0.3)  # total variation vs the target weights
    assert abs(row["largest_shift"]["change"]) == pytest.approx(0.3)
    assert table["original"]["delta_long"]["all"] == 0.0
    results = _fake_results()
    settings = _settings(strategies=("original", "global"), seeds=1)
    lines = summary_lines(settings, results)
    # One seed: the mean and "n/a" for the interval.
    assert "| global | 90.0 [n/a] | 90.0% [n/a] | 2.5x | 30.0% | +0.100 [n/a] | -0.050 [n/a] |" \
        in lines
    assert any(line.startswith("| original | 40.0 [n/a] | 20.0% [n/a] | 2.5x | 0.0% | "
                               "1.500 [n/a] (abs)") for line in lines)
    md = "\n".join(report_lines(settings, results))
    assert "| global | -0.500 ± n/a | +0.400 ± n/a | -0.050 ± n/a |" in md  # long: A, B, all
    # Without the reference the deltas are n/a, not zero.
    del strategies["original"]
    assert table_rows(strategies)["global"]["delta_long"]["A"] is None


def test_aggregate_over_seeds_by_hand():
    """Needle 80, 90, 85 -> 85 ± 4.303 * 5 / sqrt(3) = 12.42; deltas and pairwise differences
    are taken inside each seed, then summarised."""
    runs = _fake_runs({"original": [40.0, 45.0, 50.0], "per-source": [80.0, 90.0, 85.0],
                       "global": [70.0, 75.0, 80.0]},
                      {"original": [2.5, 2.6, 2.7], "per-source": [2.4, 2.45, 2.65],
                       "global": [2.5, 2.5, 2.5]})
    summary = aggregate(runs, ("original", "per-source", "global"))
    needle = summary["arms"]["per-source"]["needle"]
    assert needle["mean"] == pytest.approx(85.0) and needle["n"] == 3
    assert needle["half_width"] == pytest.approx(4.3027 * 5 / math.sqrt(3))
    assert summary["arms"]["per-source"]["needle_by_length"]["256"]["mean"] == pytest.approx(95)
    # Δ loss beyond the window vs original, per seed: -0.1, -0.15, -0.05 -> -0.1 ± 12.42/100.
    delta = summary["arms"]["per-source"]["delta_long"]["all"]
    assert delta["values"] == pytest.approx([-0.1, -0.15, -0.05])
    assert delta["half_width"] == pytest.approx(4.3027 * 0.05 / math.sqrt(3))
    assert summary["arms"]["original"]["delta_long"]["all"]["mean"] == 0.0
    share = summary["arms"]["global"]["long_share"]  # 0.2, 0.3, 0.4
    assert share["mean"] == pytest.approx(0.3)
    assert share["half_width"] == pytest.approx(4.3027 * 0.1 / math.sqrt(3))
    assert summary["arms"]["global"]["max_document_repeats"] == 3.0  # max over seeds
    assert summary["stage1"]["needle"]["mean"] == pytest.approx(6.0)
    assert summary["reference_loss"]["long"]["all"]["mean"] == pytest.approx(2.6)
    pair = summary["pairwise"]
    assert set(pair) == {"original", "global"}
    # per-source - global: needle 10, 15, 5; loss -0.1, -0.05, 0.15.
    assert pair["global"]["needle"]["mean"] == pytest.approx(10.0)
    assert pair["global"]["needle"]["separated"] is False
    assert pair["original"]["needle"]["mean"] == pytest.approx(40.0)
    assert pair["original"]["needle"]["separated"] is True
    assert pair["global"]["loss_long_all"]["values"] == pytest.approx([-0.1, -0.05, 0.15])
    assert pair["global"]["loss_long_all"]["separated"] is False

    results = _fake_results(runs, ("original", "per-source", "global"))
    settings = _settings(strategies=("original", "per-source", "global"), short_length=64)
    lines = pairwise_lines(settings, results)
    assert lines[1] == ("- per-source vs original: needle +40.0 [27.6, 52.4] -> separated by 3 "
                        "seeds; Δ loss pos 64-512 (all) -0.100 [-0.224, 0.024] -> not separated "
                        "by 3 seeds")
    assert lines[2].startswith("- per-source vs global: needle +10.0 [-2.4, 22.4] -> not "
                               "separated by 3 seeds")
    table = summary_lines(settings, results)
    assert any(line.startswith("| per-source | 85.0 [72.6, 97.4] | 30.0% [5.2%, 54.8%] | 3.0x |"
                               " 0.0% |") for line in table)
    md = "\n".join(report_lines(settings, results))
    assert "| per-source | 95.0 ± 12.4 | 75.0 ± 12.4 | 85.0 ± 12.4 |" in md  # by length
    assert ("original: original; per-source: per-source, short_keep_ratio 0.1; global: global, "
            "short_keep_ratio 0.1.") in md
    assert "| per-source | +0.000 ± 0.000 | +0.000 ± 0.000 | -0.100 ± 0.124 |" in md
    assert results["seeds"]["2"]["table"]["per-source"]["needle"] == 90.0


def test_plots_written(tmp_path):
    runs = _fake_runs({"original": [40.0, 45.0, 50.0], "global": [70.0, 75.0, 80.0]},
                      {"original": [2.5, 2.6, 2.7], "global": [2.5, 2.5, 2.5]})
    paths = AblationPaths(tmp_path)
    write_plots(_settings(), paths, _fake_results(runs))
    for name in ("loss_by_position", "domain_loss_delta", "domain_shares"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_other_settings_refused_more_seeds_extend(tmp_path):
    paths = AblationPaths(tmp_path / "out")
    claim_output_dir(_settings(), paths)
    claim_output_dir(_settings(), paths)  # same settings: resumes
    claim_output_dir(_settings(seeds=5), paths)  # more seeds: extends the same results
    with pytest.raises(ValueError, match=r"other settings \(stage2_iters\)"):
        claim_output_dir(_settings(stage2_iters=7), paths)
    with pytest.raises(ValueError, match=r"other settings \(seed\)"):
        claim_output_dir(_settings(seed=1), paths)
    assert paths.arm(1235, "cut") == tmp_path / "out/seeds/1235/strategies/cut"
    assert paths.stage1(1234) == tmp_path / "out/seeds/1234/stage1"


def test_auto_upsample_domains_are_the_papers_else_the_long_document_ones(tmp_path):
    from tests.unit.mixture_fixtures import make_slimpajama_like

    prefixes = [str(p) for p in make_slimpajama_like(tmp_path, total_tokens=400_000)]
    # SlimPajama's domains: the paper's "Upsample Arxiv/Book/Github" (Fu et al. 2024, Table 5).
    assert auto_upsample_domains(prefixes, 4096) == ["RedPajamaArXiv", "RedPajamaBook",
                                                     "RedPajamaGithub"]
    # Other data: the domains richer in long documents than the corpus.
    others = [p for p in prefixes if "Github" not in p]
    chosen = auto_upsample_domains(others, 4096)
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
    # tools/demo.py: --seeds is validated before any work, and only applies to --ablation.
    demo = str(REPO / "tools" / "demo.py")
    for extra, flag in ((["--ablation", "--seeds", "0"], "--seeds"),
                        (["--seeds", "2"], "--seeds"),
                        (["--ablation", "--strategies", "original,nope"], "--strategies")):
        proc = subprocess.run([sys.executable, demo, "--output-dir", str(tmp_path / "d"),
                               *extra], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2 and flag in proc.stderr, (extra, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()


def test_flags_cover_every_setting():
    import argparse

    from megatron_longctx.config.flags import add_config_flags, config_from_namespace

    parser = argparse.ArgumentParser()
    add_config_flags(parser, AblationSettings)
    required = ["--data-prefix", "a,b", "--stage1-checkpoint", "c", "--tokenizer-model", "t"]
    settings = config_from_namespace(AblationSettings, parser.parse_args(required))
    assert settings == AblationSettings(data_prefix=("a", "b"), stage1_checkpoint="c",
                                        tokenizer_model="t")
    assert settings.strategies == ABLATION_ARMS and settings.seeds == 3
    parsed = config_from_namespace(AblationSettings, parser.parse_args(
        [*required, "--strategies", "cut, per-source-target", "--upsample-domains", "Book",
         "--seeds", "5", "--short-keep-ratio", "0.2", "--needle-lengths", "128, 512"]))
    assert parsed.strategies == ("cut", "per-source-target")
    assert parsed.upsample_domains == ("Book",)
    assert (parsed.seeds, parsed.short_keep_ratio, parsed.needle_lengths) == (5, 0.2, (128, 512))
    assert np.isclose(parsed.long_fraction, 0.9)


def test_long_document_position_table_and_plot(tmp_path):
    # The loss by position on full-length documents: the mean over seeds per checkpoint, in
    # report.md and its own plot; absent (no table, no plot) when an evaluation had no such
    # document.
    runs = _fake_runs({"original": [40.0, 45.0, 50.0], "global": [70.0, 75.0, 80.0]},
                      {"original": [2.5, 2.6, 2.7], "global": [2.5, 2.5, 2.5]})
    for k, run in enumerate(runs.values()):
        for r in [run["stage1"], *run["strategies"].values()]:
            r["long_document_buckets"] = [
                {"start": 0, "end": 32, "label": "0-32", "tokens": 31, "loss": 3.0 + k},
                {"start": 32, "end": 64, "label": "32-64", "tokens": 32, "loss": 2.0 - 0.5 * k}]
            r["long_documents"] = {"A": 2, "B": 1}
    settings = _settings()
    results = _fake_results(runs)
    md = "\n".join(report_lines(settings, results))
    assert "## Loss by position, held-out documents of >= 512 tokens" in md
    assert "(A 2, B 1)" in md
    assert "| global | 4.000 | 1.500 |" in md  # means of 3, 4, 5 and 2.0, 1.5, 1.0
    write_plots(settings, AblationPaths(tmp_path), results)
    assert (tmp_path / "plots" / "loss_by_position_long_documents.png").stat().st_size > 1000
    next(iter(runs.values()))["strategies"]["global"]["long_document_buckets"] = None
    results = _fake_results(runs)
    assert "held-out documents of >=" not in "\n".join(report_lines(settings, results))
    write_plots(settings, AblationPaths(tmp_path / "none"), results)
    assert not (tmp_path / "none" / "plots" / "loss_by_position_long_documents.png").exists()


def test_full_length_curve_scores_each_document_once():
    # The ablation's two loss passes (documents >= short, then >= long) share documents; each
    # distinct token sequence reaches the model once, with the same losses both times.
    from megatron_longctx.demo.ablation import _LossCache

    class Counting:
        vocab_size = 100
        calls = 0

        def describe(self):
            return {"path": "fake"}

        def token_losses(self, ids):
            Counting.calls += 1
            return [0.5 * i for i in ids]

    cache = _LossCache(Counting())
    first = cache.token_losses([1, 2, 3])
    assert cache.token_losses([1, 2, 3]) == first == [0.5, 1.0, 1.5]
    cache.token_losses([1, 2])
    assert Counting.calls == 2 and cache.vocab_size == 100
    assert cache.describe() == {"path": "fake"}
