"""benchmarks/gpu_check.py: the `--cpu-smoke` run and the parent's time and exit-code logic.

The smoke run is the GPU validation script at tiny shapes with CUDA hidden: versions,
correctness (stage-1 train + save, then --finetune on a second CPU process in fp32 and bf16),
throughput (bf16 local spec through `pretrain`), needle (random HF model -> converter -> both
eval backends -> one needle cell), loss (stock vs chunked, ABBA order) run for real; the TE
part skips without CUDA. A comparison that does not happen (a run forced to OOM) is reported
as failed, never as passed. 85-100 s on the 2-core machine while other tests
ran (8 processes, 5 of them importing torch and megatron-core at 6-10 s each); the time-logic
tests take seconds.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _run(out: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--output", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "smoke.json"
    proc = _run(out, "--cpu-smoke")
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_that_can_run_on_cpu(smoke):
    proc, results = smoke
    parts = results["parts"]
    assert proc.returncode == 0, json.dumps(
        {k: (v.get("status"), v.get("reason"), v.get("log_tail", "")[-1500:])
         for k, v in parts.items()}, indent=1)
    assert results["mode"] == "cpu-smoke" and results["finished"]
    assert list(parts) == ["versions", "correctness", "throughput", "needle", "loss", "te",
                          "plan-memory", "thd-documents"]
    for name in ("versions", "correctness", "throughput", "needle"):
        assert parts[name]["status"] == "ok", (name, parts[name])
    # the summary is the last thing printed
    tail = proc.stdout.strip().splitlines()
    # (header, one line per part, the checks line, the results path)
    summary = tail[-(len(parts) + 3):]
    assert summary[0].startswith("gpu_check summary (cpu-smoke"), summary
    assert [line.split()[0] for line in summary[1:-2]] == list(parts)
    assert tail[-1].strip().startswith("results:")

    versions = parts["versions"]["result"]
    assert versions["megatron_core"] == "0.16.1" and versions["megatron_core_import"] == "ok"
    assert versions["device_name"] == "cpu" and versions["matmul_tflops"] > 0


@pytest.mark.slow
def test_cpu_smoke_correctness_compares_finetune_losses(smoke):
    _, results = smoke
    part = results["parts"]["correctness"]
    checks = part["checks"]
    # CPU vs CPU in fp32: the same computation, so exactly equal
    assert checks["cpu_fp32_vs_cpu_fp32"]["passed"]
    assert checks["cpu_fp32_vs_cpu_fp32"]["max_rel_diff"] == 0.0
    # the --finetune run starts from the trained checkpoint, not from a random model
    assert checks["checkpoint_loaded"]["passed"], checks["checkpoint_loaded"]
    bf16 = checks["cpu_bf16_vs_cpu_fp32"]
    assert len(bf16["losses"]) == len(bf16["reference"]) == 3
    assert bf16["tolerance"] == 1e-2
    assert all(x == x for x in bf16["losses"])  # finite; the verdict itself is the script's


@pytest.mark.slow
def test_cpu_smoke_throughput_and_needle_numbers(smoke):
    _, results = smoke
    runs = results["parts"]["throughput"]["result"]["runs"]
    assert set(runs) == {"128", "256"}
    for run in runs.values():
        assert run["tokens_per_s"] > 0 and run["tflops"] > 0
        assert run["mfu"] is None  # no datasheet peak for a CPU: never guessed
        assert len(run["step_s"]) == 3 and run["peak_memory_gb"] > 0
        assert run["command"].startswith("python pretrain_longctx.py --model-preset tiny")
    backends = results["parts"]["needle"]["result"]["backends"]
    for name in ("megatron", "hf"):
        assert backends[name]["prefill_tokens_per_s"] > 0, backends[name]
        assert backends[name]["decode_tokens"] == 8 and backends[name]["decode_ms_per_token"] > 0
    cell = backends["megatron"]["needle_cell"]
    assert cell["length"] == 512 and cell["tokens"] <= 512 and 0 <= cell["score"] <= 100


@pytest.mark.slow
def test_cpu_smoke_skips_with_reasons(smoke):
    _, results = smoke
    loss, te = results["parts"]["loss"], results["parts"]["te"]
    assert loss["status"] == "ok"
    assert loss["result"]["order"] == ["stock", "ours", "ours-2", "stock-2"]
    assert set(loss["result"]["runs"]) == {"stock", "ours", "ours-2", "stock-2"}
    assert loss["checks"]["step1_loss_equal"]["status"] in ("passed", "failed")
    assert loss["checks"]["chunked_peak_memory_below_stock"]["status"] in ("passed", "failed")
    assert te["status"] == "skipped" and "CUDA" in te["reason"]
    # the TE part's declared comparisons are reported as skipped with the part's reason
    for check in te["checks"].values():
        assert check["status"] == "skipped" and "CUDA" in check["reason"]
    assert "skipped 2: te.te-fp8_vs_te_bf16" in "\n".join(results["summary"])


def test_budget_cut_keeps_a_valid_json_and_fails_the_run(tmp_path):
    out = tmp_path / "cut.json"
    proc = _run(out, "--cpu-smoke", "--parts", "versions", "--budget", "versions=0.5",
                timeout=120)
    results = json.loads(out.read_text())
    entry = results["parts"]["versions"]
    assert proc.returncode == 1
    assert entry["status"] == "cut" and "budget" in entry["reason"]
    assert "part versions" in entry["log_tail"]
    assert results["finished"]
    assert any(line.split()[:2] == ["versions", "cut"] for line in proc.stdout.splitlines()
               if line.strip())


def test_global_deadline_leaves_parts_not_run(tmp_path):
    out = tmp_path / "late.json"
    proc = _run(out, "--cpu-smoke", "--deadline", "1", "--parts", "versions,te", timeout=60)
    results = json.loads(out.read_text())
    assert proc.returncode == 1
    for entry in results["parts"].values():
        assert entry["status"] == "not-run" and "global deadline" in entry["reason"]


def test_exit_code_and_budgets():
    gc = _module("gpu_check")
    ok = {"parts": {"a": {"status": "ok", "checks": {"x": {"passed": False}}},
                    "b": {"status": "skipped"}}}
    assert gc.exit_code(ok) == 0
    assert gc.exit_code(ok, strict=True) == 1
    assert gc.failed_checks(ok) == ["a.x"]
    assert gc.exit_code({"parts": {"a": {"status": "failed"}}}) == 1
    assert gc.parse_budgets(["needle=30"]) == {"needle": 30.0}
    for bad in (["nope=3"], ["needle"], ["needle=-1"]):
        with pytest.raises(ValueError):
            gc.parse_budgets(bad)
    # budgets of the GPU run fit the 8 minutes planned for one H100 run
    assert sum(p.gpu_budget_s for p in gc.PARTS) <= 8 * 60
    assert max(gc.DEFAULT_DEADLINE_S.values()) <= 8 * 60
    # 15 minutes of device time: machine start (<= 2.5 min), install + csrc build (30 s),
    # the whole run, then a rerun of the longest part (its budget + a process start + 30 s
    # of transfer and warm wait) must fit.
    rerun = max(p.gpu_budget_s for p in gc.PARTS) + gc.MIN_START_S + 30
    assert 150 + 30 + gc.DEFAULT_DEADLINE_S["gpu"] + rerun <= 15 * 60
    # the parts the table lists are the registered ones, in order
    assert [p.name for p in gc.PARTS] == ["versions", "correctness", "throughput", "needle",
                                          "loss", "te", "plan-memory",
                                          "thd-documents"]


def test_loss_part_detects_the_missing_option():
    parts = _module("gpu_check_parts")
    flags, named, candidates = parts.loss_path_flags()
    assert "--seq-length" in flags and "--on-nan-loss" in named
    assert not set(parts.NOT_LOSS_PATH_FLAGS) & set(candidates)


def test_series_retries_an_oom_with_recompute_and_skips_what_cannot_fit(tmp_path, monkeypatch):
    parts = _module("gpu_check_parts")
    calls = []

    def fake_timed_pretrain(argv, warmup):
        calls.append(argv)
        seq = int(argv[argv.index("--seq-length") + 1])
        if seq == 2048 and "--recompute-granularity" not in argv:
            raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return {"median_step_s": 0.5 * seq / 1024, "setup_s": 1.0, "tflops": 1.0}

    monkeypatch.setattr(parts, "timed_pretrain", fake_timed_pretrain)
    config = {"mode": "cpu-smoke", "deadline": parts.time.time() + 60,
              "work_dir": str(tmp_path / "w"), "output": str(tmp_path / "part.json")}
    ctx = parts.Ctx(config, parts.Recorder(config["output"]))
    items = [(str(seq), parts._throughput_argv(ctx.shapes, seq, 5), 2, float(seq))
             for seq in (1024, 2048, 1024 * 1024)]
    runs = {}
    parts._run_series(ctx, items, runs, oom_retry=lambda argv: [*argv, *parts.RECOMPUTE_ARGS])
    assert "CUDA OOM" in runs["2048"]["error"]
    assert runs["2048-recompute"]["median_step_s"] == 1.0
    # 1M tokens: 1 s setup + 5 steps x 0.5 s x 1024 (FLOPs ratio) = 2561 s > 60 s left
    assert "estimated 2561 s" in runs["1048576"]["skipped"]
    assert len(calls) == 3
    recorded = json.loads((tmp_path / "part.json").read_text())
    assert recorded["result"]["runs"]["2048"]["error"].startswith("CUDA OOM")


def test_a_missing_comparison_is_failed_never_passed():
    """Pure bookkeeping: a declared comparison left pending (a killed part) or missing (a run
    it needed failed) counts as failed in the summary and the exit code; a skipped one is
    listed with its reason; "passed" counts only comparisons that were made."""
    gc = _module("gpu_check")
    checks = {"made": {"status": "passed", "passed": True},
              "lost": {"status": "pending", "passed": None, "what": "x vs y"}}
    gc.finalize_checks(checks, "cut", "killed after 60 s")
    assert checks["lost"] == {"status": "missing", "passed": False, "what": "x vs y",
                              "reason": "did not happen (part cut: killed after 60 s)"}
    results = {"mode": "gpu", "elapsed_s": 1.0, "deadline_s": 470.0,
               "parts": {"loss": {"status": "ok", "checks": checks},
                         "te": {"status": "skipped", "checks": gc.finalize_checks(
                             {"fp8": {"status": "pending"}}, "skipped", "no TE")}}}
    line = gc.checks_line(results)
    assert line.startswith("1 passed; FAILED 1: loss.lost (did not happen")
    assert "skipped 1: te.fp8 (part skipped: no TE)" in line
    assert "all" not in line
    assert gc.exit_code(results) == 1  # a comparison that did not happen fails the run
    assert gc.failed_checks(results) == ["loss.lost"]
    # the pre-existing form (no status, passed False) still counts as failed
    assert gc.failed_checks({"parts": {"a": {"checks": {"x": {"passed": False}}}}}) == ["a.x"]


@pytest.mark.slow
def test_cpu_smoke_forced_oom_reports_the_comparison_failed(tmp_path):
    """--simulate-oom: both stock runs of the loss part raise a CUDA OOM, so its comparisons
    cannot be made: failed ("missing", with the OOM as reason) in the JSON and the summary,
    and the run exits 1; the summary never says they passed."""
    out = tmp_path / "oom.json"
    proc = _run(out, "--cpu-smoke", "--parts", "loss", "--simulate-oom", "loss:stock",
                "--simulate-oom", "loss:stock-2", timeout=300)
    results = json.loads(out.read_text())
    loss = results["parts"]["loss"]
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "CUDA OOM" in loss["result"]["runs"]["stock"]["error"]
    assert "tokens_per_s" in loss["result"]["runs"]["ours"]
    for name in ("step1_loss_equal", "chunked_peak_memory_below_stock"):
        check = loss["checks"][name]
        assert check["status"] == "missing" and check["passed"] is False
        assert "no completed run of stock" in check["reason"] and "OOM" in check["reason"]
    line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("checks:"))
    assert "FAILED 2: loss.step1_loss_equal" in line and "0 passed" in line
    assert "memory_ratio" not in loss["result"]
