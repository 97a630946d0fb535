#!/usr/bin/env python3
"""One prepared GPU validation run: versions, correctness, throughput, needle, loss path, TE.

    python benchmarks/gpu_check.py --output $OUT/gpu_check.json      # on the GPU machine
    python benchmarks/gpu_check.py --cpu-smoke --output /tmp/smoke.json  # same code, tiny, CPU

One command, one JSON result file, a summary table printed last. Each part runs in its own
child process (`--child NAME`, internal), in this order, and is skipped with a reason when its
requirement is missing (no CUDA, megatron-core or Transformer Engine not importable). Parts are
registered in gpu_check_parts.py (`register_part`; its docstring says how to add one):

===========  =============================================================  ======  ========
part         what it measures (the product's code paths it goes through)    budget  estimate
===========  =============================================================  ======  ========
versions     torch / CUDA / driver / GPU / megatron-core / TE versions,     30 s    ~15 s
             csrc backend, measured bf16 matmul TFLOP/s (8192^3)
correctness  tiny preset: `pretrain` 20 steps on CPU + `--save`; then       60 s    ~30 s
             `--load --finetune` 4 steps on CPU fp32 (reference, in the
             part's own process), CUDA fp32 and CUDA bf16; losses compared
throughput   LLaMA-2 7B layer shapes x 4 (1.07B params), bf16, local spec   75 s    ~35 s
             + SDPA, mock data, `pretrain` at 8K / 32K / 64K tokens:
             tokens/s, TFLOP/s, MFU (training/metrics.py), peak memory
needle       random HF LLaMA (same shapes) -> `convert_hf_to_megatron` ->   80 s    ~50 s
             our eval backend at 32K: prefill tokens/s, decode ms/token,
             one needle cell (`run_needle`); then the HF backend the same
loss         stock vs chunked loss, 2 layers of that shape, 16K tokens,     50 s    ~30 s
             LLaMA-3's 128,256 vocabulary, order stock/ours/ours/stock:
             peak memory, step time, first loss
te           TE spec bf16, FP8 hybrid delayed, FP8 + FP8 attention at 8K:   60 s    ~40 s
             losses vs TE bf16 and tokens/s (skips without TE)
plan-memory  the layout planner's estimate (megatron_longctx/plan) vs      60 s    ~45 s
             torch.cuda.max_memory_allocated: 2 layers of LLaMA-2 7B,
             bf16, 16K and 32K tokens, local spec and TE when present
thd-documents  document masking: TE THD attention (CP1) vs the CPU twin on   50 s    ~35 s
             one packed batch (out, q/k/v grads); 1 layer at 32K causal
             vs --reset-attention-mask step time
===========  =============================================================  ======  ========

Estimates are for one H100 SXM.
Budgets sum to 465 s (7 min 45 s), under the 470 s global deadline. Device time (15 minutes in
all): machine start (~2 min) + install and csrc build (~30 s) + this run (<= 470 s) + a rerun of
the longest part (80 s + a process start) + transfers leave ~2 minutes spare
(docs/gpu-validation.md has the plan). Estimates come from FLOPs at 40% of the H100's 989
TFLOP/s bf16 peak plus process starts (~5 s each: torch + megatron-core import, CUDA context)
and model builds: docs/gpu-validation.md has the arithmetic. A part is killed at min(its
budget, time left before the global deadline, `--deadline`, default 470 s) and recorded as
`cut` with what it had written so far; the run goes on with the next part. Inside a part, each
item (a sequence length, a backend) checks the time left and skips itself with the reason when
its estimate does not fit, so a slow GPU loses the last items, not the whole part.

Comparisons (checks) are declared by their part before it runs anything: one that did not
happen (a run OOMed, the part was cut or crashed) is reported as failed ("missing", with the
reason) in the JSON and in the summary's `checks:` line, and makes the exit code 1; one that
cannot apply (FP8 before compute capability 8.9, a part skipped for lack of CUDA/TE) is listed
as skipped with its reason. "passed" counts only comparisons that were made.
`--simulate-oom PART:RUN` (a test hook) makes one run of a part raise a CUDA OOM.

Timed regions never include compilation or first-call costs: training steps are timed after
warm-up steps of the same shapes in the same `pretrain`; the needle warms up with the whole
timed prompt (megatron's bias fusions are `torch.compile`d on CUDA, and a shorter warm-up
prompt left the timed prefill's shapes to compile); the loss part runs stock, ours, ours,
stock so that neither side gets the process's first run only.

Trade-offs:
* A process per part costs ~5 s of imports each (~30 s in all) but isolates CUDA OOMs, hangs
  and megatron's global parallel state, and makes the per-part deadline a plain kill.
* The parent never imports torch (no CUDA context held while children run); it polls the
  child's result file twice a second and rewrites the output JSON atomically (tmp + rename)
  whenever it changes, so a kill of the whole run still leaves every finished item on disk.
* Failed checks (e.g. loss agreement) do not change the exit code unless `--strict`: the
  run's job is to record numbers; exit 1 means a part failed, was cut, or was not run for lack
  of time, or a declared comparison did not happen.

`--cpu-smoke` runs every part with tiny shapes on CPU (CUDA hidden from the children), so the
same code runs in CI (tests/unit/test_gpu_check.py); the CPU "device" leg of the correctness
part is then a second CPU run. Parts that need CUDA or TE skip with their reason.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The part table (stdlib imports only at module level: the parent never imports torch).
from gpu_check_parts import PARTS as _PARTS  # noqa: E402
from gpu_check_parts import finalize_checks  # noqa: E402

FORMAT = "megatron-longctx gpu_check 1"
DEFAULT_OUTPUT = REPO / "bench_output" / "gpu_check.json"
#: Seconds from the run's start after which no part is started and a running one is cut.
DEFAULT_DEADLINE_S = {"gpu": 470.0, "cpu-smoke": 450.0}
#: A part is not started with less than this left (a process start alone takes ~5 s).
MIN_START_S = 8.0
POLL_S = 0.5


#: Parts in run order, registered in gpu_check_parts.py (`register_part`).
PARTS = tuple(_PARTS.values())
PART_NAMES = tuple(p.name for p in PARTS)
PARTS_BY_NAME = {p.name: p for p in PARTS}


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write to `path.tmp` then rename: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def parse_budgets(items: list[str]) -> dict[str, float]:
    """`--budget name=seconds` overrides."""
    out: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in PART_NAMES or not value:
            raise ValueError(f"--budget {item!r}: expected NAME=SECONDS with NAME in "
                             f"{', '.join(PART_NAMES)}")
        out[name] = float(value)
        if out[name] <= 0:
            raise ValueError(f"--budget {item!r}: seconds must be positive")
    return out


def parse_simulated_ooms(items: list[str]) -> dict[str, list[str]]:
    """`--simulate-oom PART:RUN` (test hook): that run of that part raises a CUDA OOM."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, _, label = item.partition(":")
        if name not in PART_NAMES or not label:
            raise ValueError(f"--simulate-oom {item!r}: expected PART:RUN with PART in "
                             f"{', '.join(PART_NAMES)}")
        out.setdefault(name, []).append(label)
    return out


class Run:
    """The parent: runs the parts in children, merges their results, writes the JSON."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode = "cpu-smoke" if args.cpu_smoke else "gpu"
        self.output = Path(args.output).resolve()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = self.output.with_suffix(".log")
        self.start = time.time()
        self.deadline = self.start + (args.deadline if args.deadline is not None
                                      else DEFAULT_DEADLINE_S[self.mode])
        overrides = parse_budgets(args.budget or [])
        self.simulated_ooms = parse_simulated_ooms(args.simulate_oom or [])
        self.budgets = {p.name: overrides.get(
            p.name, p.smoke_budget_s if args.cpu_smoke else p.gpu_budget_s) for p in PARTS}
        selected = args.parts.split(",") if args.parts else list(PART_NAMES)
        unknown = [p for p in selected if p not in PART_NAMES]
        if unknown:
            raise ValueError(f"--parts: unknown {unknown}; choose from {', '.join(PART_NAMES)}")
        self.selected = [p for p in PART_NAMES if p in selected]
        self.work = Path(args.work_dir).resolve() if args.work_dir else Path(
            tempfile.mkdtemp(prefix="gpu_check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: dict = {
            "format": FORMAT,
            "mode": self.mode,
            "command": [sys.executable, *sys.argv],
            "started": _now_iso(),
            "finished": None,
            "elapsed_s": 0.0,
            "deadline_s": round(self.deadline - self.start, 1),
            "budgets_s": self.budgets,
            "log": str(self.log_path),
            "parts": {name: {"status": "pending", "budget_s": self.budgets[name]}
                      for name in self.selected},
        }

    # -- bookkeeping ----------------------------------------------------------------------
    def save(self) -> None:
        self.results["elapsed_s"] = round(time.time() - self.start, 1)
        write_json_atomic(self.output, self.results)

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        paths = [str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        if self.mode == "cpu-smoke":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the same code, on CPU, even where a GPU exists
        return env

    # -- one part -------------------------------------------------------------------------
    def run_part(self, name: str) -> None:
        entry = self.results["parts"][name]
        left = self.deadline - time.time()
        if left < MIN_START_S:
            entry.update(status="not-run", reason=f"global deadline: {left:.0f} s left, a part "
                         f"needs at least {MIN_START_S:.0f} s")
            self.save()
            return
        timeout = min(self.budgets[name], left)
        part_out = self.work / f"part-{name}.json"
        part_out.unlink(missing_ok=True)
        context = {k: v.get("result") for k, v in self.results["parts"].items()
                   if v.get("status") == "ok"}
        config = {"part": name, "mode": self.mode, "work_dir": str(self.work / name),
                  "output": str(part_out), "deadline": time.time() + timeout - 2.0,
                  "budget_s": timeout, "context": context,
                  "simulate_oom": self.simulated_ooms.get(name, [])}
        env = self.child_env()
        if PARTS_BY_NAME[name].cpu_process:
            config["device_cuda_visible_devices"] = env.get("CUDA_VISIBLE_DEVICES")
            env["CUDA_VISIBLE_DEVICES"] = ""
        config_path = self.work / f"part-{name}.config.json"
        write_json_atomic(config_path, config)
        entry.update(status="running", started=_now_iso(), timeout_s=round(timeout, 1))
        self.save()
        print(f"[gpu_check] {name}: started (budget {timeout:.0f} s)", flush=True)
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n===== part {name} ({_now_iso()}) =====\n")
            log.flush()
            t0 = time.time()
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--child", name,
                 "--child-config", str(config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env,
                start_new_session=True)
            seen = None
            cut = False
            while True:
                try:
                    rc = proc.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    rc = None
                seen = self._merge(entry, part_out, seen)
                if time.time() - t0 > timeout:
                    cut = True
                    self._kill(proc)
                    rc = proc.returncode
                    break
            elapsed = time.time() - t0
        self._merge(entry, part_out, None)
        entry["elapsed_s"] = round(elapsed, 1)
        status = entry.get("status")
        if cut:
            entry["status"] = "cut"
            entry["reason"] = (f"killed after {elapsed:.0f} s (budget {timeout:.0f} s); items "
                               "finished before the cut are kept in result")
        elif rc != 0 or status not in ("ok", "skipped"):
            entry["status"] = "failed"
            entry.setdefault("reason", f"child exited with code {rc} (status {status!r})")
        # A killed or crashed child could not close its declared comparisons: they did not
        # happen, and say so (never counted as passed).
        finalize_checks(entry.get("checks") or {}, entry["status"], entry.get("reason"))
        if entry["status"] in ("failed", "cut"):
            entry["log_tail"] = _tail_from(self.log_path, log_start)
        self.save()
        print(f"[gpu_check] {name}: {entry['status']} in {elapsed:.1f} s"
              + (f" ({entry['reason']})" if entry.get("reason") else ""), flush=True)

    def _merge(self, entry: dict, part_out: Path, seen: float | None) -> float | None:
        try:
            mtime = part_out.stat().st_mtime_ns
        except OSError:
            return seen
        if mtime == seen:
            return seen
        data = _read_json(part_out)
        if data is not None:
            for key in ("status", "reason", "result", "checks", "errors", "traceback"):
                if key in data:
                    entry[key] = data[key]
            self.save()
        return mtime

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """SIGTERM the child's session (its legs too), then SIGKILL after 5 s."""
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    # -- the run --------------------------------------------------------------------------
    def run(self) -> int:
        self.log_path.write_text(f"gpu_check {self.mode} log, {_now_iso()}\n", encoding="utf-8")
        self.save()
        try:
            for name in self.selected:
                self.run_part(name)
        finally:
            self.results["finished"] = _now_iso()
            self.save()
            if not self.args.keep_work and not self.args.work_dir:
                shutil.rmtree(self.work, ignore_errors=True)
        lines = summary_lines(self.results)
        self.results["summary"] = lines
        self.save()
        print("\n".join(lines), flush=True)
        return exit_code(self.results, strict=self.args.strict)


def _tail_from(path: Path, start: int, limit: int = 3000) -> str:
    """The last `limit` characters this part appended to the log."""
    text = _tail(path, limit + 200)
    try:
        size = path.stat().st_size
    except OSError:
        return text
    if size - start < len(text):
        text = text[len(text) - (size - start):]
    return text[-limit:]


def _checks_with(results: dict, statuses: tuple[str, ...]) -> list[str]:
    out = []
    for name, entry in results.get("parts", {}).items():
        for check, value in (entry.get("checks") or {}).items():
            if not isinstance(value, dict):
                continue
            status = value.get("status") or ("failed" if value.get("passed") is False
                                             else "passed" if value.get("passed") else None)
            if status in statuses:
                out.append(f"{name}.{check}")
    return out


def failed_checks(results: dict) -> list[str]:
    """'part.check' for every comparison that failed or did not happen (missing)."""
    return _checks_with(results, ("failed", "missing", "pending"))


def missing_checks(results: dict) -> list[str]:
    """'part.check' for every declared comparison that did not happen."""
    return _checks_with(results, ("missing", "pending"))


def exit_code(results: dict, *, strict: bool = False) -> int:
    """0: every part ok or skipped for a missing requirement, every declared comparison made
    (and, with strict, passed); 1 when a part failed, was cut, or was not run for lack of
    time, or a comparison did not happen."""
    bad = [n for n, e in results.get("parts", {}).items()
           if e.get("status") not in ("ok", "skipped")]
    if bad or missing_checks(results) or (strict and failed_checks(results)):
        return 1
    return 0


def _fmt(value: object, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _highlights(name: str, entry: dict) -> str:
    """One line of the part's key numbers for the summary."""
    r = entry.get("result") or {}
    if name == "versions":
        return (f"{r.get('device_name', '-')}, torch {r.get('torch', '-')}, CUDA "
                f"{r.get('cuda', '-')}, megatron-core {r.get('megatron_core', '-')}, TE "
                f"{r.get('transformer_engine', '-')}, matmul {_fmt(r.get('matmul_tflops'))} "
                "TFLOP/s")
    if name == "correctness":
        checks = entry.get("checks") or {}
        return ", ".join(f"{k} max rel {_fmt(v.get('max_rel_diff'))} "
                         f"{'ok' if v.get('passed') else 'FAIL'}" for k, v in checks.items())
    if name in ("throughput", "te", "loss"):
        parts = []
        for key, item in (r.get("runs") or {}).items():
            if item.get("error"):
                parts.append(f"{key}: {item['error'][:40]}")
            elif item.get("skipped"):
                parts.append(f"{key}: skipped")
            else:
                mfu = item.get("mfu")
                parts.append(f"{key}: {_fmt(item.get('tokens_per_s'), '.0f')} tok/s, "
                             f"{_fmt(item.get('tflops'), '.3g')} TF"
                             + (f", MFU {100 * mfu:.0f}%" if mfu is not None else "")
                             + f", {_fmt(item.get('peak_memory_gb'), '.1f')} GB")
        if name == "loss" and r.get("memory_ratio") is not None:
            parts.append(f"memory stock/ours {r['memory_ratio']:.2f}x, time ours/stock "
                         f"{r['time_ratio']:.2f}x")
        return "; ".join(parts)
    if name == "needle":
        parts = []
        for key, item in (r.get("backends") or {}).items():
            if item.get("error") or item.get("skipped"):
                parts.append(f"{key}: {(item.get('error') or item.get('skipped'))[:40]}")
            else:
                parts.append(f"{key}: prefill {_fmt(item.get('prefill_tokens_per_s'), '.0f')} "
                             f"tok/s, decode {_fmt(item.get('decode_ms_per_token'), '.1f')} "
                             "ms/tok")
        return "; ".join(parts)
    return ""


def checks_line(results: dict) -> str:
    """Passed, failed (a comparison that did not happen is failed, with its reason) and
    skipped (with the reason) comparisons; "passed" only counts comparisons that were made."""
    passed = _checks_with(results, ("passed",))
    failed = failed_checks(results)
    skipped = _checks_with(results, ("skipped",))
    if not (passed or failed or skipped):
        return "none declared"

    def why(key: str) -> str:
        part, _, check = key.partition(".")
        value = results["parts"][part]["checks"][check]
        reason = value.get("reason")
        return f"{key} ({reason[:80]})" if reason else key

    out = [f"{len(passed)} passed"]
    if failed:
        out.append(f"FAILED {len(failed)}: " + ", ".join(why(k) for k in failed))
    if skipped:
        out.append(f"skipped {len(skipped)}: " + ", ".join(why(k) for k in skipped))
    return "; ".join(out)


def summary_lines(results: dict) -> list[str]:
    """The table printed last (and stored under `summary`)."""
    lines = ["", f"gpu_check summary ({results['mode']}, {results['elapsed_s']:.0f} s, "
             f"deadline {results['deadline_s']:.0f} s)"]
    for name, entry in results["parts"].items():
        status = entry.get("status", "?")
        took = entry.get("elapsed_s")
        head = f"  {name:<12s} {status:<8s} {_fmt(took, '.0f'):>4s} s"
        detail = entry.get("reason") if status != "ok" else _highlights(name, entry)
        if status == "cut" and entry.get("result"):
            detail = f"{detail}; before the cut: {_highlights(name, entry)}"
        lines.append(f"{head}  {detail or ''}".rstrip())
    lines.append("  checks: " + checks_line(results))
    lines.append(f"  results: {results.get('output', '')}".rstrip())
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT),
                        help="result JSON (the log goes next to it as .log)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on CPU (CUDA hidden): the CI check of this script")
    parser.add_argument("--parts", default=None,
                        help=f"comma-separated subset of {','.join(PART_NAMES)}")
    parser.add_argument("--deadline", type=float, default=None,
                        help="global seconds limit (default 470 on GPU, 450 with --cpu-smoke)")
    parser.add_argument("--budget", action="append", default=None, metavar="PART=SECONDS",
                        help="override one part's time budget (repeatable)")
    parser.add_argument("--work-dir", default=None,
                        help="scratch directory for checkpoints (default: a temporary one, "
                        "removed at the end)")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary work dir")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a check fails, not only when a part fails")
    parser.add_argument("--simulate-oom", action="append", default=None, metavar="PART:RUN",
                        help="test hook: that run of that part raises a CUDA OOM (repeatable)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        from gpu_check_parts import run_child

        return run_child(args.child, args.child_config)
    try:
        run = Run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run.results["output"] = str(run.output)
    return run.run()


if __name__ == "__main__":
    sys.exit(main())
