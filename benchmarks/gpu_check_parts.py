"""The parts of benchmarks/gpu_check.py; each runs in its own child process.

Adding a part (the only registration there is): write `def part_NAME(ctx: Ctx) -> None` below
and decorate it with `@register_part(NAME, gpu_budget_s=..., smoke_budget_s=..., what=...)`.
Parts run in the order they are registered (the order of this file); gpu_check.py takes its
table, `--parts` names and budgets from `PARTS`. Inside the part:

* declare every comparison before running anything it needs: `ctx.rec.expect(NAME, what)`;
  then record it with `ctx.rec.check(NAME, {"passed": bool, ...})`, or
  `ctx.rec.skip_check(NAME, reason)` when it cannot apply (e.g. FP8 on a pre-Hopper GPU). A
  declared comparison that is neither recorded nor skipped when the part ends (a run OOMed,
  the part raised, was skipped, or was cut) is reported as failed ("missing", with the reason)
  in the JSON and the summary, and fails the run's exit code; it never reads as passed.
* measured items go through `ctx.rec.result(...)`, which rewrites the result file, so a cut
  part keeps what it finished;
* raise `SkipPartError(reason)` when a requirement is missing.
Legs of a part that need their own process (`spawn_child`) are registered with
`register_leg`. The part's budget goes into docs/gpu-validation.md's time plan.

A child reads its config (JSON written by the parent: part, mode, deadline, work dir, results
of earlier parts), runs one part function and writes its result file atomically after every
item, so the parent (which polls it) keeps whatever finished even when the child is killed.

Every part drives the product's public code, never a re-implementation:

* configs from Megatron-style argv through `config.training.parse_pretrain_args` (each result
  records the equivalent `pretrain_longctx.py` command line);
* training through `training.loop.pretrain` (datasets, model chunks, Float16Module, DDP,
  megatron's optimizer, the step); step time is read by wrapping `loop.train_step` with a
  device synchronisation on each side: the data preparation and logging between steps are
  outside the timed region (they are ~ms against 0.1-3 s steps);
* FLOPs and MFU through `training.metrics.flops_per_token` (causal count) / `peak_tflops` /
  `ThroughputMeter`, peak memory through `metrics.memory_stats`;
* the needle through `convert.hf_llama.convert_hf_to_megatron`, `eval.models.load_causal_lm`
  and `eval.needle.run_needle`.

Tolerances (stated here, checked in the correctness and TE parts):

* fp32, CUDA vs CPU: step 1 (no update applied yet) within 1e-5 relative; later steps within
  1e-4 (Adam divides by sqrt(v): fp32 reduction-order noise in a near-zero gradient becomes an
  lr-sized update: 1.8e-5 on weights after 3 steps at lr 1e-3, measured on CPU; here lr is
  1e-4). TF32 is switched off for that leg.
* bf16 vs the fp32 CPU reference: every step within 1e-2 relative (bf16 has an 8-bit mantissa,
  ~4e-3 per rounding; the loss is a mean over all tokens, so per-element errors average out).
* FP8 (TE) vs TE bf16: every step within 2e-2 relative.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().with_name("gpu_check.py")

FP32_STEP1_RTOL = 1e-5
FP32_RTOL = 1e-4
BF16_RTOL = 1e-2
FP8_RTOL = 2e-2

#: The pretrain flags that select the stock loss path and ours (model/loss.py).
#: None would make the part look for such a flag, report candidates, and skip.
LOSS_PATH_ARGS: dict[str, list[str]] | None = {
    "stock": ["--cross-entropy-impl", "megatron"],
    "ours": ["--cross-entropy-impl", "chunked"],
}
#: Flags that name the loss but do not select its implementation (not the loss-path switch).
NOT_LOSS_PATH_FLAGS = ("--on-nan-loss", "--eod-mask-loss")

RECOMPUTE_ARGS = ["--recompute-granularity", "full", "--recompute-method", "uniform",
                  "--recompute-num-layers", "1"]


@dataclass(frozen=True)
class Shapes:
    """Sizes of every part; GPU_SHAPES for the device, SMOKE_SHAPES for --cpu-smoke."""

    # correctness: the tiny preset, stage 1 (from scratch, saved) then --finetune steps
    corr_preset: str = "tiny"
    corr_vocab: int = 512
    corr_seq: int = 128
    corr_gbs: int = 4
    corr_stage1_steps: int = 20
    corr_stage1_lr: float = 3e-3
    corr_steps: int = 4
    corr_lr: float = 1e-4
    # throughput: LLaMA-2 7B layers (4096 / 11008 / 32 heads), 4 of them, 1.07B parameters
    tp_preset: str = "llama2-7b"
    tp_layers: int = 4
    tp_vocab: int = 32000
    tp_seqs: tuple[int, ...] = (8192, 32768, 65536)
    tp_warmup: int = 2
    tp_timed: int = 3
    # needle: the throughput shape as a random HF model, prompt length, decode tokens
    needle_length: int = 32768
    needle_decode_tokens: int = 32
    needle_new_tokens: int = 50
    needle_tokenizer_vocab: int = 4096
    needle_rotary_base: int = 500000
    # loss: 2 layers of the throughput shape with LLaMA-3's vocabulary at 16K tokens: the
    # stock path's ~58 GB fits an 80 GB H100 (docs/gpu-validation.md has the arithmetic)
    loss_layers: int = 2
    loss_vocab: int = 128256
    loss_seq: int = 16384
    loss_warmup: int = 2
    loss_timed: int = 2
    # te
    te_seq: int = 8192
    te_warmup: int = 2
    te_timed: int = 4
    # versions: n x n x n matmul
    matmul_n: int = 8192


GPU_SHAPES = Shapes()
SMOKE_SHAPES = Shapes(
    corr_seq=64, corr_gbs=2, corr_stage1_steps=8, corr_steps=3,
    tp_preset="tiny", tp_layers=2, tp_vocab=512, tp_seqs=(128, 256), tp_warmup=1, tp_timed=2,
    needle_length=512, needle_decode_tokens=8, needle_new_tokens=8, needle_tokenizer_vocab=400,
    needle_rotary_base=10000, loss_vocab=4096, loss_seq=256, loss_warmup=1, te_seq=256,
    te_warmup=1,
    te_timed=2, matmul_n=256,
)


class SkipPartError(Exception):
    """The part's requirement is missing; the message is the reason recorded."""


@dataclass(frozen=True)
class Part:
    """One registered part: name, hard time budget per mode (seconds), a one-line
    description, and the function its child process runs."""

    name: str
    gpu_budget_s: float
    smoke_budget_s: float
    what: str
    run: Callable[[Ctx], None]
    #: The part's own process runs with CUDA hidden (a CPU reference); it is told the original
    #: CUDA_VISIBLE_DEVICES to start its device leg with.
    cpu_process: bool = False


#: Every part in run order (`register_part`); gpu_check.py reads this table.
PARTS: dict[str, Part] = {}
#: Functions a part starts in a process of their own (`spawn_child`), by name.
LEGS: dict[str, Callable[[Ctx], None]] = {}


def register_part(name: str, *, gpu_budget_s: float, smoke_budget_s: float, what: str,
                  cpu_process: bool = False) -> Callable[[Callable[[Ctx], None]],
                                                         Callable[[Ctx], None]]:
    """Decorator: add the function to PARTS under `name` (see the module docstring)."""
    def add(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        if name in PARTS or name in LEGS:
            raise ValueError(f"gpu_check part {name!r} registered twice")
        PARTS[name] = Part(name, gpu_budget_s, smoke_budget_s, what, fn, cpu_process)
        return fn
    return add


def register_leg(name: str) -> Callable[[Callable[[Ctx], None]], Callable[[Ctx], None]]:
    """Decorator: a function a part runs in a child process of its own (`spawn_child`)."""
    def add(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        if name in PARTS or name in LEGS:
            raise ValueError(f"gpu_check leg {name!r} registered twice")
        LEGS[name] = fn
        return fn
    return add


def finalize_checks(checks: dict[str, Any], status: str, reason: str | None) -> dict[str, Any]:
    """Declared comparisons still pending when a part ended: skipped with the part's reason
    when the part was skipped, otherwise failed as missing (they did not happen)."""
    for check in checks.values():
        if isinstance(check, dict) and check.get("status") == "pending":
            if status == "skipped":
                check.update(status="skipped", passed=None,
                             reason=f"part skipped: {reason}")
            else:
                check.update(status="missing", passed=False,
                             reason=f"did not happen (part {status}"
                             + (f": {reason}" if reason else "") + ")")
    return checks


# ---------------------------------------------------------------------------------------------
# child plumbing
# ---------------------------------------------------------------------------------------------
class Recorder:
    """The child's result file: status, result, checks, errors; rewritten atomically."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"status": "running", "result": {}, "checks": {},
                                     "errors": []}
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(self.data, handle, indent=1, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def result(self, **values: Any) -> None:
        self.data["result"].update(values)
        self.write()

    def expect(self, name: str, what: str) -> None:
        """Declare a comparison this part will make (see the module docstring)."""
        self.data["checks"].setdefault(name, {"status": "pending", "passed": None,
                                              "what": what})
        self.write()

    def check(self, name: str, value: dict[str, Any]) -> None:
        what = (self.data["checks"].get(name) or {}).get("what")
        self.data["checks"][name] = {**({"what": what} if what else {}), **value,
                                     "status": "passed" if value.get("passed") else "failed"}
        self.write()

    def missing(self, name: str, reason: str) -> None:
        """A declared comparison that could not be made (a run it needs failed): failed."""
        what = (self.data["checks"].get(name) or {}).get("what")
        self.data["checks"][name] = {**({"what": what} if what else {}), "status": "missing",
                                     "passed": False, "reason": reason}
        self.write()

    def skip_check(self, name: str, reason: str) -> None:
        """A declared comparison that cannot apply here, with the reason."""
        what = (self.data["checks"].get(name) or {}).get("what")
        self.data["checks"][name] = {**({"what": what} if what else {}), "status": "skipped",
                                     "passed": None, "reason": reason}
        self.write()

    def error(self, where: str, err: BaseException) -> None:
        self.data["errors"].append(f"{where}: {type(err).__name__}: {err}"[:500])
        self.write()

    def finish(self, status: str, reason: str | None = None) -> None:
        self.data["status"] = status
        if reason is not None:
            self.data["reason"] = reason
        finalize_checks(self.data["checks"], status, reason)
        self.write()


class Ctx:
    """What a part function gets: its config, shapes, recorder, deadline and work dir."""

    def __init__(self, config: dict[str, Any], recorder: Recorder) -> None:
        self.config = config
        self.rec = recorder
        self.smoke = config["mode"] == "cpu-smoke"
        self.shapes = SMOKE_SHAPES if self.smoke else GPU_SHAPES
        self.deadline = float(config["deadline"])
        self.work = Path(config["work_dir"])
        self.work.mkdir(parents=True, exist_ok=True)
        self.context = config.get("context") or {}

    def time_left(self) -> float:
        return self.deadline - time.time()


def run_child(name: str, config_path: str) -> int:
    """Entry of `gpu_check.py --child NAME`: run one part, record its outcome."""
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    from megatron_longctx.tool_env import quiet_tool_warnings

    quiet_tool_warnings()
    rec = Recorder(config["output"])
    ctx = Ctx(config, rec)
    try:
        (PARTS[name].run if name in PARTS else LEGS[name])(ctx)
    except SkipPartError as skip:
        rec.finish("skipped", str(skip))
        print(f"[{name}] skipped: {skip}", flush=True)
        return 0
    except BaseException as err:  # recorded, then the parent marks the part failed
        traceback.print_exc()
        rec.data["traceback"] = traceback.format_exc()[-3000:]
        rec.finish("failed", f"{type(err).__name__}: {err}"[:500])
        return 1
    rec.finish("ok")
    return 0


def spawn_child(name: str, config: dict[str, Any], path: Path, *,
                env: dict[str, str] | None = None, timeout: float) -> dict[str, Any]:
    """Run another child (a leg of a part) to completion; its result file's contents."""
    config_path = path.with_suffix(".config.json")
    config = {**config, "output": str(path)}
    config_path.write_text(json.dumps(config), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--child", name, "--child-config",
                           str(config_path)], env=env, cwd=str(REPO), timeout=max(timeout, 1))
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if proc.returncode != 0 or data.get("status") not in ("ok", "skipped"):
        raise RuntimeError(f"{name} exited {proc.returncode}: {data.get('reason', 'no result')}")
    return data


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def require_megatron() -> None:
    try:
        import megatron.core  # noqa: F401
    except Exception as err:
        raise SkipPartError(f"megatron-core is not importable ({type(err).__name__}: {err}); "
                       "install the carried wheels (make gpu-wheels)") from None


def require_cuda(ctx: Ctx) -> None:
    """GPU mode needs CUDA; --cpu-smoke runs the same code on CPU instead."""
    import torch

    if not ctx.smoke and not torch.cuda.is_available():
        raise SkipPartError("no CUDA device (torch.cuda.is_available() is False); --cpu-smoke runs "
                       "this part on CPU")


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_diffs(values: list[float], reference: list[float]) -> list[float]:
    """|a - b| / |b| per step (inf where a value is not finite)."""
    out = []
    for a, b in zip(values, reference):
        if a != a or b != b or abs(a) == float("inf"):
            out.append(float("inf"))
        else:
            out.append(abs(a - b) / max(abs(b), 1e-30))
    return out


def trainer_argv(*, preset: str, seq: int, vocab: int, gbs: int, iters: int, lr: float,
                 layers: int | None = None, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """pretrain_longctx.py flags of one run (mock data, NullTokenizer, one process)."""
    argv = ["--model-preset", preset, "--seq-length", str(seq), "--mock-data",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab),
            "--micro-batch-size", "1", "--global-batch-size", str(gbs),
            "--train-iters", str(iters), "--lr", str(lr), "--log-interval", "1",
            "--seed", "1234"]
    if layers is not None:
        argv += ["--num-layers", str(layers)]
    return argv + list(extra)


def pretrain_config(argv: list[str]) -> Any:
    """A validated PretrainConfig from the flags, as the entrypoint builds it."""
    from megatron_longctx.config.training import parse_pretrain_args
    from megatron_longctx.model.build import te_available

    cfg = parse_pretrain_args(argv)
    cfg.validate(1, te_available=te_available())
    return cfg


_DIST_READY = False


def ensure_distributed(cfg: Any) -> None:
    """One-process torch.distributed + megatron groups (nccl on CUDA, gloo on CPU), once."""
    global _DIST_READY
    if _DIST_READY:
        return
    from megatron_longctx.parallel.init import initialize_distributed

    initialize_distributed(cfg.parallel, seed=cfg.training.seed)
    _DIST_READY = True


def timed_pretrain(argv: list[str], warmup: int) -> dict[str, Any]:
    """Run `pretrain` with these flags; losses, per-step seconds, rates and peak memory.

    Step time: `loop.train_step` wrapped with a device synchronisation on each side; the
    median of the steps after `warmup` (the first steps include cuBLAS/SDPA kernel selection,
    allocator growth and optimizer-state creation). Rates from that median with
    `metrics.ThroughputMeter` (one device, causal FLOPs); peak memory from
    `metrics.memory_stats` after resetting the CUDA peak counters at the start of the run.
    """
    import torch

    from megatron_longctx.parallel.init import set_seed
    from megatron_longctx.training import loop, metrics

    cfg = pretrain_config(argv)
    ensure_distributed(cfg)
    set_seed(cfg.training.seed)  # same initial weights for every run of this process
    times: list[float] = []
    original = loop.train_step

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        sync()
        start = time.perf_counter()
        out = original(*args, **kwargs)
        sync()
        times.append(time.perf_counter() - start)
        return out

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    loop.train_step = timed_step
    start = time.perf_counter()
    try:
        result = loop.pretrain(cfg, world_size=1)
    finally:
        loop.train_step = original
    wall = time.perf_counter() - start
    if result.exit_code != 0:
        raise RuntimeError(f"pretrain exited {result.exit_code} ({result.reason})")
    if len(times) != len(result.losses):
        raise RuntimeError(f"the step timer saw {len(times)} of {len(result.losses)} steps: "
                           "training/loop.py no longer calls its module-level train_step")
    seq, gbs = cfg.model.seq_length, cfg.global_batch_size(1)
    steady = times[warmup:] or times
    step_s = statistics.median(steady)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    fp8 = cfg.precision.fp8 is not None
    # MFU against the bf16 peak, FP8 runs too (training/metrics.py peak_tflops).
    peak = metrics.peak_tflops(device_name, cfg.precision.params_dtype, False)
    fpt = metrics.flops_per_token(cfg.model, seq)
    rates = metrics.ThroughputMeter(seq * gbs, 1, fpt, peak).update(step_s)
    fp8_peak = metrics.peak_tflops(device_name, cfg.precision.params_dtype, True) if fp8 else None
    memory = metrics.memory_stats()
    out = {
        "command": "python pretrain_longctx.py " + " ".join(argv),
        "seq_length": seq, "tokens_per_step": seq * gbs,
        "losses": result.losses, "step_s": [round(t, 4) for t in times],
        "median_step_s": step_s, "tokens_per_s": rates["tokens_per_s"],
        "tflops": rates["tflops_per_device"], "mfu": rates["mfu"], "peak_tflops": peak,
        **({"mfu_vs_fp8_peak": rates["tflops_per_device"] / fp8_peak} if fp8_peak else {}),
        "flops_per_token": fpt, "setup_s": round(wall - sum(times), 2),
        "peak_memory_gb": memory.get("max_allocated_gb", memory["max_rss_gb"]),
        "memory": memory,
    }
    del result
    free_memory()
    return out


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _label(seq: int) -> str:
    return f"{seq // 1024}K" if seq >= 1024 and seq % 1024 == 0 else str(seq)


def _estimate_s(prev: dict[str, Any] | None, flops_ratio: float, steps: int) -> float | None:
    """Seconds the next run should take: the last run's setup plus its step time scaled by the
    ratio of FLOPs per step; None before the first run (nothing to scale)."""
    if prev is None or "median_step_s" not in prev:
        return None
    return prev["setup_s"] + steps * prev["median_step_s"] * flops_ratio


# ---------------------------------------------------------------------------------------------
# part 1: versions
# ---------------------------------------------------------------------------------------------
@register_part("versions", gpu_budget_s=30, smoke_budget_s=60,
               what="versions, GPU, measured bf16 matmul rate")
def part_versions(ctx: Ctx) -> None:
    """Versions of everything the numbers depend on, and the device's measured matmul rate."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "megatron_core": _version("megatron-core"),
        "transformer_engine": _version("transformer-engine") or _version("transformer_engine"),
        "transformers": _version("transformers"), "tokenizers": _version("tokenizers"),
        "numpy": _version("numpy"), "nltk": _version("nltk"), "zstandard": _version("zstandard"),
        "wonderwords": _version("wonderwords"), "einops": _version("einops"),
        "cpu_count": os.cpu_count(),
    }
    try:
        import megatron.core  # noqa: F401

        info["megatron_core_import"] = "ok"
    except Exception as err:
        info["megatron_core_import"] = f"{type(err).__name__}: {err}"[:300]
    from megatron_longctx.data import native

    info["csrc_backend"] = native.BACKEND
    ctx.rec.result(**info)
    if info["megatron_core_import"] == "ok":
        from megatron_longctx.model.build import te_available

        info["te_importable"] = te_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device_name=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            sm_count=props.multi_processor_count,
            total_memory_gb=round(props.total_memory / 2**30, 1),
            flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
            mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
        try:
            query = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                 "power.limit", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=15)
            info["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
            fields = [f.strip() for f in info["nvidia_smi"].split(",")]
            if len(fields) >= 2:
                info["driver"] = fields[1]
        except (OSError, subprocess.SubprocessError) as err:
            info["nvidia_smi"] = f"unavailable: {err}"
        from megatron_longctx.training.metrics import peak_tflops

        info["datasheet_bf16_tflops"] = peak_tflops(info["device_name"], "bf16", False)
    else:
        info["device_name"] = "cpu"
    ctx.rec.result(**info)
    info.update(measure_matmul(ctx.shapes.matmul_n))
    ctx.rec.result(**info)


def measure_matmul(n: int) -> dict[str, Any]:
    """Dense matmul rate on random data (never zeros: they run faster than real data).

    CUDA: bf16 n x n x n, 3 warm-ups, then the median of 10 products timed with CUDA events
    (KINDS.md saw 769-798 TFLOP/s on an H200 at n = 8192). CPU: fp32, wall clock (smoke).
    """
    import torch

    on_cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_cuda else ("cpu", torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        torch.mm(a, b)
    sync()
    times = []
    for _ in range(10):
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    return {"matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""),
            "matmul_tflops": 2 * n**3 / seconds / 1e12}


# ---------------------------------------------------------------------------------------------
# part 2: correctness
# ---------------------------------------------------------------------------------------------
def _corr_argv(s: Shapes, *, iters: int, lr: float, extra: list[str]) -> list[str]:
    return trainer_argv(preset=s.corr_preset, seq=s.corr_seq, vocab=s.corr_vocab,
                        gbs=s.corr_gbs, iters=iters, lr=lr,
                        extra=["--transformer-impl", "local", *extra])


@register_part("correctness", gpu_budget_s=60, smoke_budget_s=150,
               what="tiny model losses: CUDA fp32 == CPU, bf16 within tolerance",
               cpu_process=True)
def part_correctness(ctx: Ctx) -> None:
    """CPU reference leg in this process, then the device leg; compare the --finetune losses.

    Reference (this process: the parent starts it with CUDA hidden): stage 1 trains the tiny
    model from scratch and saves a trainer checkpoint (`--save`); then `--load --finetune`
    takes `corr_steps` fp32 steps. Device (a child with the GPU visible; in --cpu-smoke a
    second CPU process): the same finetune in fp32 with TF32 off, then in bf16. Starting from a
    trained checkpoint makes the check see a lost load: a model that drops the loaded weights
    (an earlier bf16 defect) jumps back to the ~ln(vocab) loss of a random model instead of
    continuing from where stage 1 ended.
    """
    versions = ctx.context.get("versions") or {}
    if not ctx.smoke and versions.get("cuda_available") is False:
        raise SkipPartError("no CUDA device (versions: torch.cuda.is_available() is False); "
                            "--cpu-smoke runs this part on CPU")
    device = "cpu" if ctx.smoke else "cuda"
    for name in ("fp32", "bf16"):
        ctx.rec.expect(f"{device}_{name}_vs_cpu_fp32",
                       f"--finetune losses on {device} in {name} vs the CPU fp32 reference")
    ctx.rec.expect("checkpoint_loaded", "the --finetune run starts from the trained checkpoint")
    require_megatron()
    ckpt = ctx.work / "stage1"
    shutil.rmtree(ckpt, ignore_errors=True)
    ctx.config = {**ctx.config, "checkpoint": str(ckpt)}
    legs: dict[str, Any] = {"reference": correctness_reference(ctx)}
    ctx.rec.result(**legs)
    env = dict(os.environ)
    visible = ctx.config.get("device_cuda_visible_devices")
    if visible is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = visible
    data = spawn_child("correctness-leg", {**ctx.config, "work_dir": str(ctx.work / "device")},
                       ctx.work / "leg-device.json", env=env, timeout=ctx.time_left())
    if data.get("status") == "skipped":
        raise SkipPartError(f"device leg: {data.get('reason')}")
    legs["device"] = data["result"]
    ctx.rec.result(**legs)
    ref = legs["reference"]["fp32"]["losses"]
    stage1 = legs["reference"]["stage1"]["losses"]
    for name, losses, tolerances in (
            ("fp32", legs["device"]["fp32"]["losses"], (FP32_STEP1_RTOL, FP32_RTOL)),
            ("bf16", legs["device"]["bf16"]["losses"], (BF16_RTOL, BF16_RTOL))):
        diffs = rel_diffs(losses, ref)
        passed = (len(losses) == len(ref) and bool(diffs) and diffs[0] <= tolerances[0]
                  and all(d <= tolerances[1] for d in diffs[1:]))
        ctx.rec.check(f"{legs['device']['device']}_{name}_vs_cpu_fp32", {
            "passed": passed, "rel_diffs": diffs, "max_rel_diff": max(diffs or [float("inf")]),
            "tolerance_step1": tolerances[0], "tolerance": tolerances[1],
            "losses": losses, "reference": ref})
    # the load took effect: finetune starts near where stage 1 ended, not at a random model's
    ctx.rec.check("checkpoint_loaded", {
        "passed": ref[0] < stage1[0] - 0.05,
        "stage1_first_loss": stage1[0], "stage1_last_loss": stage1[-1],
        "finetune_first_loss": ref[0]})


def correctness_reference(ctx: Ctx) -> dict[str, Any]:
    """Stage 1 from scratch with --save, then the fp32 --finetune steps, on CPU."""
    import torch

    if torch.cuda.is_available():
        raise RuntimeError("the correctness reference must run with CUDA hidden "
                           "(CUDA_VISIBLE_DEVICES=''); the parent sets it")
    s = ctx.shapes
    ckpt = ctx.config["checkpoint"]
    stage1 = timed_pretrain(_corr_argv(s, iters=s.corr_stage1_steps, lr=s.corr_stage1_lr,
                                       extra=["--save", ckpt]), warmup=0)
    fp32 = timed_pretrain(_corr_argv(s, iters=s.corr_steps, lr=s.corr_lr,
                                     extra=["--load", ckpt, "--finetune"]), warmup=0)
    return {"device": "cpu", "stage1": stage1, "fp32": fp32}


@register_leg("correctness-leg")
def part_correctness_leg(ctx: Ctx) -> None:
    """The device leg of the correctness part: --finetune in fp32 (TF32 off), then bf16."""
    import torch

    require_cuda(ctx)
    s = ctx.shapes
    finetune = ["--load", ctx.config["checkpoint"], "--finetune"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx.rec.result(device=device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    fp32 = timed_pretrain(_corr_argv(s, iters=s.corr_steps, lr=s.corr_lr, extra=finetune),
                          warmup=0)
    ctx.rec.result(fp32={**fp32, "tf32": torch.backends.cuda.matmul.allow_tf32})
    bf16 = timed_pretrain(_corr_argv(s, iters=s.corr_steps, lr=s.corr_lr,
                                     extra=[*finetune, "--bf16"]), warmup=0)
    ctx.rec.result(bf16=bf16)


# ---------------------------------------------------------------------------------------------
# part 3: throughput
# ---------------------------------------------------------------------------------------------
def _throughput_argv(s: Shapes, seq: int, iters: int, extra: list[str] | None = None,
                     vocab: int | None = None, layers: int | None = None) -> list[str]:
    return trainer_argv(preset=s.tp_preset, layers=layers or s.tp_layers, seq=seq,
                        vocab=vocab or s.tp_vocab, gbs=1, iters=iters, lr=1e-5,
                        extra=["--transformer-impl", "local", "--bf16", *(extra or [])])


def _run_series(ctx: Ctx, items: list[tuple[str, list[str], int, float]],
                runs: dict[str, Any], *, oom_retry: Callable[[list[str]], list[str]] | None
                ) -> None:
    """Run (label, argv, warmup, flops per step) items in order, each only if its estimate
    fits the time left; record each into `runs` (and the result file) as it finishes."""
    prev, prev_flops = None, None
    for label, argv, warmup, flops in items:
        steps = int(argv[argv.index("--train-iters") + 1])
        estimate = _estimate_s(prev, flops / prev_flops if prev_flops else 1.0, steps)
        left = ctx.time_left()
        if estimate is not None and estimate > left - 3:
            runs[label] = {"skipped": f"estimated {estimate:.0f} s, {left:.0f} s left"}
            ctx.rec.result(runs=runs)
            continue
        oom = None
        try:
            if label in ctx.config.get("simulate_oom", ()):
                raise RuntimeError(f"CUDA out of memory (simulated by --simulate-oom "
                                   f"{ctx.config['part']}:{label})")
            runs[label] = timed_pretrain(argv, warmup)
            prev, prev_flops = runs[label], flops
        except Exception as err:
            oom = _is_oom(err)
            runs[label] = {"error": f"{'CUDA OOM' if oom else type(err).__name__}: "
                                    f"{str(err)[:300]}", "command": " ".join(argv)}
            ctx.rec.error(label, err)
        # Outside the except block: its traceback, which holds the failed run's model and
        # optimizer through pretrain's frames, is released before memory is reclaimed.
        free_memory()
        if oom and oom_retry is not None:
            estimate = _estimate_s(prev, 4 / 3 * flops / (prev_flops or flops), steps)
            if estimate is None or estimate < ctx.time_left() - 3:
                try:
                    runs[label + "-recompute"] = timed_pretrain(oom_retry(argv), warmup)
                except Exception as err:
                    runs[label + "-recompute"] = {"error": f"{type(err).__name__}: "
                                                           f"{str(err)[:300]}"}
                free_memory()
            else:
                runs[label + "-recompute"] = {
                    "skipped": f"estimated {estimate:.0f} s, {ctx.time_left():.0f} s left"}
        ctx.rec.result(runs=runs)


@register_part("throughput", gpu_budget_s=75, smoke_budget_s=120,
               what="1.07B LLaMA-shaped bf16 local+SDPA at 8K/32K/64K")
def part_throughput(ctx: Ctx) -> None:
    """LLaMA-shaped 1.07B model (LLaMA-2 7B layers, 4 of them), bf16, local spec + SDPA, at
    each of `tp_seqs` tokens: `tp_warmup` + `tp_timed` steps of `pretrain` on mock data.

    Without recompute (the H200's 139 GiB holds 64K: ~19 GB of weights, fp32 grads and Adam
    state, ~13 GB of activations per layer at 64K on the unfused local spec, and the stock
    loss's fp32 logits 64K x 32000); on an OOM (an 80 GB H100 at 64K) the length is retried
    with full recompute of every layer (+1 forward, ~4/3 the FLOPs) and recorded as such.
    """
    require_megatron()
    require_cuda(ctx)
    from megatron_longctx.training.metrics import flops_per_token

    s = ctx.shapes
    iters = s.tp_warmup + s.tp_timed
    items = []
    for seq in s.tp_seqs:
        argv = _throughput_argv(s, seq, iters)
        flops = flops_per_token(pretrain_config(argv).model, seq) * seq
        items.append((_label(seq), argv, s.tp_warmup, flops))
    runs: dict[str, Any] = {}
    ctx.rec.result(model=f"{s.tp_preset} x {s.tp_layers} layers, vocab {s.tp_vocab}", runs=runs,
                   matmul_tflops=(ctx.context.get("versions") or {}).get("matmul_tflops"))
    _run_series(ctx, items, runs, oom_retry=lambda argv: [*argv, *RECOMPUTE_ARGS])
    measured = (ctx.context.get("versions") or {}).get("matmul_tflops")
    if measured:
        for run in runs.values():
            if "tflops" in run:
                run["fraction_of_measured_matmul"] = run["tflops"] / measured
        ctx.rec.result(runs=runs)
    if not any("tflops" in r for r in runs.values()):
        raise RuntimeError("no sequence length completed: " + json.dumps(runs)[:400])


# ---------------------------------------------------------------------------------------------
# part 4: needle
# ---------------------------------------------------------------------------------------------
def _hf_model_dir(ctx: Ctx) -> tuple[Path, dict[str, Any]]:
    """A random HF LlamaForCausalLM with the throughput shape and an offline BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_longctx.config.presets import get_preset
    from megatron_longctx.convert.hf_llama import copy_tokenizer_files, hf_config_from_model
    from megatron_longctx.data.train_tokenizer import train_bpe_tokenizer
    from megatron_longctx.eval.needle import synthetic_haystack_texts

    s = ctx.shapes
    timings: dict[str, float] = {}
    t = time.perf_counter()
    tok_dir = ctx.work / "tokenizer"
    train_bpe_tokenizer(synthetic_haystack_texts(50000, seed=7), str(tok_dir),
                        vocab_size=s.needle_tokenizer_vocab)
    timings["tokenizer_s"] = time.perf_counter() - t
    model_cfg = dataclasses.replace(
        get_preset(s.tp_preset), num_layers=s.tp_layers, vocab_size=s.tp_vocab,
        seq_length=s.needle_length, rotary_base=s.needle_rotary_base,
        max_position_embeddings=s.needle_length + 2 * s.needle_new_tokens + 64)
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    hf = hf_config_from_model(model_cfg, dtype)
    hf.pop("torch_dtype", None)
    t = time.perf_counter()
    hf_dir = ctx.work / "hf"
    shutil.rmtree(hf_dir, ignore_errors=True)
    torch.manual_seed(1234)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**hf))
    model.to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]).cpu().save_pretrained(hf_dir)
    del model
    free_memory()
    copy_tokenizer_files(tok_dir, hf_dir)
    timings["hf_model_s"] = time.perf_counter() - t
    return hf_dir, {"model": dataclasses.asdict(model_cfg), "dtype": dtype, **timings}


def _time_generation(model: Any, length: int, decode_tokens: int) -> dict[str, Any]:
    """Prefill tokens/s and decode ms/token of one `model.generate` on a random prompt.

    The backend's two hooks (`CausalLM._prefill`: the chunked prompt forward into the KV
    cache; `_step`: one cached decode step) are wrapped on the instance with a device
    synchronisation on each side, so one generation gives both numbers; decode is the median
    step. stop_ids=[] so EOS cannot end it early. A warm-up generation on the same prompt
    first takes compilation, kernel selection and allocator growth out of the numbers.
    """
    import numpy as np
    import torch

    vocab = model.tokenizer.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, size=length).tolist()
    # Warm-up with the timed shapes: the whole prompt (the same prefill chunks) and a few
    # decode steps. On CUDA megatron's bias fusions are torch.compile'd: a warm-up on a shorter
    # prompt leaves the timed prefill's shapes to compile inside the timed region. Costs one
    # more prefill (~0.3 s at 32K on an H100 by FLOPs).
    model.generate(ids, 1 + min(3, decode_tokens), stop_ids=[])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds: dict[str, list[float]] = {"_prefill": [], "_step": []}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            seconds[name].append(time.perf_counter() - start)
            return out
        return wrapper

    for name in seconds:
        setattr(model, name, timed(name, getattr(model, name)))
    try:
        start = time.perf_counter()
        out = model.generate(ids, 1 + decode_tokens, stop_ids=[])
        total = time.perf_counter() - start
    finally:
        for name in seconds:
            delattr(model, name)  # back to the class's methods
    prefill = seconds["_prefill"][0]
    result = {"prompt_tokens": length, "prefill_s": prefill,
              "prefill_tokens_per_s": length / prefill, "decode_tokens": len(out) - 1,
              "decode_ms_per_token": 1e3 * statistics.median(seconds["_step"] or [float("nan")]),
              "generate_s": total, "prefill_chunk": getattr(model, "prefill_chunk", None)}
    if torch.cuda.is_available():
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


@register_part("needle", gpu_budget_s=80, smoke_budget_s=120,
               what="converted random HF model, needle tool at 32K")
def part_needle(ctx: Ctx) -> None:
    """The needle tool at `needle_length` on a converted random HF model.

    Random HF LLaMA (throughput shape, RoPE base 500K so 32K is inside the rotary range) ->
    `convert_hf_to_megatron` -> `load_causal_lm` (our megatron backend, KV cache, chunked
    prefill) -> prefill/decode timing -> one `run_needle` cell at depth 50% (the paper's
    protocol; a random model scores ~0, the cell proves the path). Then the HF backend on the
    same directory for comparison, if time is left. Scores are not a result here.
    """
    require_megatron()
    require_cuda(ctx)
    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron
    from megatron_longctx.eval.models import load_causal_lm
    from megatron_longctx.eval.needle import NeedleSettings, run_needle

    s = ctx.shapes
    hf_dir, info = _hf_model_dir(ctx)
    ctx.rec.result(**info)
    t = time.perf_counter()
    ckpt = ctx.work / "converted"
    shutil.rmtree(ckpt, ignore_errors=True)
    convert_hf_to_megatron(hf_dir, ckpt)
    ctx.rec.result(convert_s=time.perf_counter() - t)
    backends: dict[str, Any] = {}
    ctx.rec.result(backends=backends)
    for name, path in (("megatron", ckpt), ("hf", hf_dir)):
        if name == "hf" and ctx.time_left() < 2 * backends.get("megatron", {}).get("wall_s", 0):
            backends[name] = {"skipped": f"{ctx.time_left():.0f} s left"}
            ctx.rec.result(backends=backends)
            continue
        t = time.perf_counter()
        try:
            with load_causal_lm(path) as model:
                entry: dict[str, Any] = {"load_s": time.perf_counter() - t,
                                         "describe": model.describe()}
                entry.update(_time_generation(model, s.needle_length, s.needle_decode_tokens))
                backends[name] = entry
                ctx.rec.result(backends=backends)
                if name == "megatron":
                    settings = NeedleSettings(lengths=[s.needle_length], depths=[50.0],
                                              max_new_tokens=s.needle_new_tokens)
                    results = run_needle(model, settings, ctx.work / "needle-results",
                                         overwrite=True, log=None)
                    cell = results["cells"][0]
                    entry["needle_cell"] = {k: cell[k] for k in (
                        "length", "depth", "tokens", "score", "seconds", "generated_tokens")}
                    entry["needle_cell"]["response"] = cell["response"][:80]
        except Exception as err:
            backends[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            ctx.rec.error(name, err)
        backends[name]["wall_s"] = time.perf_counter() - t
        free_memory()
        ctx.rec.result(backends=backends)
    if "prefill_tokens_per_s" not in backends.get("megatron", {}):
        raise RuntimeError(f"our backend did not run: {backends.get('megatron')}")


# ---------------------------------------------------------------------------------------------
# part 5: stock vs chunked loss
# ---------------------------------------------------------------------------------------------
def loss_path_flags() -> tuple[list[str], list[str], list[str]]:
    """pretrain_longctx.py's flags: all, those naming the loss, and those among them not known
    to be unrelated options (candidates for the loss-path switch)."""
    from megatron_longctx.config.training import build_pretrain_parser

    flags = [opt for action in build_pretrain_parser()._actions
             for opt in action.option_strings if opt.startswith("--")]
    named = [f for f in flags if re.search(r"loss|cross.?entropy|logit", f)]
    return flags, named, [f for f in named if f not in NOT_LOSS_PATH_FLAGS]


@register_part("loss", gpu_budget_s=50, smoke_budget_s=120,
               what="stock vs chunked loss: memory, time, loss")
def part_loss(ctx: Ctx) -> None:
    """Stock megatron loss path vs ours (the chunked cross-entropy, model/loss.py) at
    `loss_seq` tokens with LLaMA-3's vocabulary, `loss_layers` layers of the throughput shape:
    peak memory, step time and the first loss of both, in the same process.

    Order stock, ours, ours, stock (ABBA): the first run of a process pays one-off costs
    (cuBLAS handles, allocator growth, NCCL buffers) that would otherwise favour the second
    side; each side's time is the faster of its two medians, its memory the larger peak.
    Declared comparisons (missing ones are failures, see the module docstring): the first
    losses agree within bf16 tolerance; ours peaks lower. Skips when `LOSS_PATH_ARGS` names a
    flag pretrain_longctx.py does not have.
    """
    ctx.rec.expect("step1_loss_equal", "first-step loss, chunked vs stock, within 1e-2")
    ctx.rec.expect("chunked_peak_memory_below_stock", "peak memory, chunked < stock")
    flags, named, candidates = loss_path_flags()
    missing = [] if LOSS_PATH_ARGS is None else [
        f for args in LOSS_PATH_ARGS.values() for f in args
        if f.startswith("--") and f not in flags]
    if LOSS_PATH_ARGS is None or missing:
        raise SkipPartError(
            "the chunked loss is not in this tree: no pretrain_longctx.py flag selects "
            f"the loss path (flags naming the loss: {', '.join(named) or 'none'}; candidates: "
            f"{', '.join(candidates) or 'none'}"
            + (f"; LOSS_PATH_ARGS names missing flags {missing}" if missing else
               "; set LOSS_PATH_ARGS in benchmarks/gpu_check_parts.py when it lands") + ")")
    require_megatron()
    require_cuda(ctx)
    s = ctx.shapes
    iters = s.loss_warmup + s.loss_timed
    runs: dict[str, Any] = {}
    argv = {name: _throughput_argv(s, s.loss_seq, iters, extra=args, vocab=s.loss_vocab,
                                   layers=s.loss_layers)
            for name, args in LOSS_PATH_ARGS.items()}
    order = [("stock", "stock"), ("ours", "ours"), ("ours-2", "ours"), ("stock-2", "stock")]
    items = [(label, argv[side], s.loss_warmup, 1.0) for label, side in order]
    ctx.rec.result(model=f"{s.tp_preset} x {s.loss_layers} layers, vocab {s.loss_vocab}, "
                   f"{s.loss_seq} tokens", order=[label for label, _ in order], runs=runs)
    _run_series(ctx, items, runs, oom_retry=None)
    done = {side: [runs[label] for label, sd in order
                   if sd == side and "peak_memory_gb" in runs.get(label, {})]
            for side in ("stock", "ours")}
    if not (done["stock"] and done["ours"]):
        why = []
        for label, _ in order:
            run = runs.get(label, {})
            if "peak_memory_gb" not in run:
                why.append(f"{label}: {run.get('error') or run.get('skipped') or 'not run'}")
        for name in ("step1_loss_equal", "chunked_peak_memory_below_stock"):
            ctx.rec.missing(name, "no completed run of "
                            + " and ".join(k for k, v in done.items() if not v)
                            + ": " + "; ".join(w[:160] for w in why))
        return
    stock_mem = max(r["peak_memory_gb"] for r in done["stock"])
    ours_mem = max(r["peak_memory_gb"] for r in done["ours"])
    stock_s = min(r["median_step_s"] for r in done["stock"])
    ours_s = min(r["median_step_s"] for r in done["ours"])
    ctx.rec.result(memory_ratio=stock_mem / ours_mem, time_ratio=ours_s / stock_s,
                   runs_per_side={k: len(v) for k, v in done.items()})
    diffs = rel_diffs(done["ours"][0]["losses"][:1], done["stock"][0]["losses"][:1])
    ctx.rec.check("step1_loss_equal", {"passed": diffs[0] <= BF16_RTOL,
                                       "rel_diff": diffs[0], "tolerance": BF16_RTOL})
    ctx.rec.check("chunked_peak_memory_below_stock", {
        "passed": ours_mem < stock_mem, "stock_gb": stock_mem, "ours_gb": ours_mem,
        "ratio": stock_mem / ours_mem})


# ---------------------------------------------------------------------------------------------
# part 6: Transformer Engine
# ---------------------------------------------------------------------------------------------
TE_VARIANTS: dict[str, list[str]] = {
    "te-bf16": ["--transformer-impl", "transformer_engine", "--bf16"],
    "te-fp8": ["--transformer-impl", "transformer_engine", "--bf16", "--fp8-format", "hybrid",
               "--fp8-recipe", "delayed", "--fp8-amax-history-len", "1024",
               "--fp8-amax-compute-algo", "max"],
}
TE_VARIANTS["te-fp8-attention"] = [*TE_VARIANTS["te-fp8"], "--fp8-dot-product-attention"]


@register_part("te", gpu_budget_s=60, smoke_budget_s=60,
               what="Transformer Engine bf16 / FP8 / FP8 attention")
def part_te(ctx: Ctx) -> None:
    """TE spec in bf16, FP8 (hybrid, delayed scaling) and FP8 + FP8 attention at `te_seq`
    tokens, same model and seed: tokens/s of each, FP8 losses against TE bf16 (2e-2).
    MFU is against the bf16 peak for the FP8 runs too; `mfu_vs_fp8_peak` is the other figure."""
    for name in TE_VARIANTS:
        if name != "te-bf16":
            ctx.rec.expect(f"{name}_vs_te_bf16", f"{name} losses vs TE bf16 within {FP8_RTOL}")
    versions = ctx.context.get("versions") or {}
    if ctx.smoke or versions.get("cuda_available") is False:
        raise SkipPartError("no CUDA device: Transformer Engine runs only on CUDA")
    import torch

    if not torch.cuda.is_available():
        raise SkipPartError("no CUDA device: Transformer Engine runs only on CUDA")
    require_megatron()
    from megatron_longctx.model.build import te_available

    if not te_available():
        raise SkipPartError(
            "transformer_engine.pytorch is not importable (not installed on this machine)")
    s = ctx.shapes
    fp8_ok = torch.cuda.get_device_capability() >= (8, 9)
    iters = s.te_warmup + s.te_timed
    items = []
    for name, args in TE_VARIANTS.items():
        if "--fp8-format" in args and not fp8_ok:
            continue
        argv = trainer_argv(preset=s.tp_preset, layers=s.tp_layers, seq=s.te_seq,
                            vocab=s.tp_vocab, gbs=1, iters=iters, lr=1e-5, extra=args)
        items.append((name, argv, s.te_warmup, 1.0))
    runs: dict[str, Any] = {}
    _run_series(ctx, items, runs, oom_retry=None)
    base = runs.get("te-bf16", {}).get("losses")
    for name, run in runs.items():
        if name != "te-bf16" and base and run.get("losses"):
            diffs = rel_diffs(run["losses"], base)
            ctx.rec.check(f"{name}_vs_te_bf16", {
                "passed": max(diffs) <= FP8_RTOL, "max_rel_diff": max(diffs),
                "rel_diffs": diffs, "tolerance": FP8_RTOL})
    if not fp8_ok:
        ctx.rec.result(fp8_skipped="FP8 needs compute capability 8.9+")
        for name in TE_VARIANTS:
            if name != "te-bf16":
                ctx.rec.skip_check(f"{name}_vs_te_bf16", "FP8 needs compute capability 8.9+")


# ---------------------------------------------------------------------------------------------
# part: the layout planner's estimate against the device's measured peak
# ---------------------------------------------------------------------------------------------
@register_part("plan-memory", gpu_budget_s=60, smoke_budget_s=150,
               what="planner estimate vs max_memory_allocated, 7B slice 16K/32K")
def part_plan_memory(ctx: Ctx) -> None:
    """`megatron_longctx.plan.memory.estimate_memory` (no allocator margin) vs
    `torch.cuda.max_memory_allocated` for a 2-layer slice of LLaMA-2 7B (bf16, one GPU, 2 steps
    of `pretrain`) at 16K and 32K tokens, local spec and, when importable, Transformer Engine.
    Check: total within 10% (docs/slurm.md has the CPU table; this is the GPU leg, including
    the TE terms that CPU runs cannot measure). --cpu-smoke: the tiny preset at 1K/2K, peak
    RSS against the estimate (RSS includes the process's ~0.5 GB baseline: recorded only)."""
    require_megatron()
    require_cuda(ctx)
    from megatron_longctx.model.build import te_available
    from megatron_longctx.plan.inputs import layout_from_config, trainer_model
    from megatron_longctx.plan.memory import estimate_memory

    preset, vocab, layers = ("tiny", 512, 2) if ctx.smoke else ("llama2-7b", 32000, 2)
    seqs = (1024, 2048) if ctx.smoke else (16384, 32768)
    impls = ["local"] + (["transformer_engine"] if te_available() and not ctx.smoke else [])
    runs: dict[str, Any] = {}
    ctx.rec.result(model=f"{preset} x {layers} layers, bf16", runs=runs)
    if not ctx.smoke:
        for impl in impls:
            for seq in seqs:
                ctx.rec.expect(f"plan {impl} {_label(seq)} within 10%",
                               "planner estimate vs torch.cuda.max_memory_allocated")
    for impl in impls:
        for seq in seqs:
            label = f"{impl} {_label(seq)}"
            if ctx.time_left() < 15:
                runs[label] = {"skipped": "deadline"}
                continue
            argv = trainer_argv(preset=preset, seq=seq, vocab=vocab, gbs=1, iters=2, lr=1e-5,
                                layers=layers, extra=["--bf16", "--transformer-impl", impl])
            try:
                measured = timed_pretrain(argv, warmup=1)
            except Exception as err:  # noqa: BLE001  (an OOM or a TE failure is a result)
                ctx.rec.error(label, err)
                runs[label] = {"error": f"{type(err).__name__}: {err}"[:300]}
                free_memory()
                continue
            cfg = pretrain_config(argv)
            est = estimate_memory(trainer_model(cfg),
                                  layout_from_config(cfg, 1, cuda=not ctx.smoke),
                                  margin_fraction=0.0, margin_fixed=0)
            peak_gb = measured["peak_memory_gb"] * (1 << 30) / 1e9
            est_gb = est.raw_bytes / 1e9
            runs[label] = {"command": measured["command"], "measured_gb": round(peak_gb, 3),
                           "estimated_gb": round(est_gb, 3),
                           "model_state_gb": round(est.model_state_bytes / 1e9, 3),
                           "rel_error": round((est_gb - peak_gb) / peak_gb, 4)}
            ctx.rec.result(runs=runs)
            if not ctx.smoke:
                ctx.rec.check(f"plan {label} within 10%",
                              {"passed": abs(est_gb - peak_gb) <= 0.1 * peak_gb,
                               "measured_gb": peak_gb, "estimated_gb": est_gb})

#: thd-documents: packed documents, the attention comparison's row and the timed runs.
THD_DOC_STARTS = (0, 1, 5, 9, 200, 1031, 1500)  # lengths 1, 4, 4, 191, 831, 469, 548 of 2048
THD_ATTN_RTOL = 2e-2  # bf16 (TE) vs fp32 (twin on CPU): relative max error of out and grads
THD_SEQ = {"gpu": 32768, "smoke": 256}


def _thd_attention_compare(te_ok: bool) -> dict[str, Any]:
    """One THD batch through megatron's TEDotProductAttention (TE, CP1, bf16, on the device)
    and through our SDPA twin (fp32 on the CPU, and bf16 on the device): output and the
    gradients of q, k, v for the loss sum(out * g); errors relative to the twin's fp32."""
    import torch
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_longctx.config.model import ParallelConfig, PrecisionConfig
    from megatron_longctx.config.presets import get_preset
    from megatron_longctx.model.attention import SDPACoreAttention
    from megatron_longctx.model.build import build_transformer_config
    from megatron_longctx.parallel.thd import pack_row, thd_seq_params

    seq, heads, groups, dim = 2048, 32, 8, 128
    model = dataclasses.replace(get_preset("llama3-8b"), seq_length=seq)
    row = pack_row(list(THD_DOC_STARTS), seq, 1)
    cu = torch.from_numpy(row.cu_seqlens.astype("int64"))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(seq, heads, dim, generator=gen)
    k = torch.randn(seq, groups, dim, generator=gen)
    v = torch.randn(seq, groups, dim, generator=gen)
    g = torch.randn(seq, heads * dim, generator=gen)

    def run(core: Any, device: str, dtype: Any) -> list[Any]:
        params = thd_seq_params(cu, seq, False, device=torch.device(device))
        leaves = [t.detach().to(device, dtype).clone().requires_grad_() for t in (q, k, v)]
        out = core(*leaves, None, attn_mask_type=AttnMaskType.causal,
                   packed_seq_params=params)
        out = out.reshape(seq, heads * dim)
        (out.float() * g.to(device)).sum().backward()
        return [t.detach().float().cpu() for t in (out, *(x.grad for x in leaves))]

    def rel(a: Any, b: Any) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))

    cfg32 = build_transformer_config(model, ParallelConfig(), PrecisionConfig())
    ref = run(SDPACoreAttention(config=cfg32, layer_number=1,
                                attn_mask_type=AttnMaskType.causal), "cpu", torch.float32)
    cfg16 = build_transformer_config(model, ParallelConfig(), PrecisionConfig(params_dtype="bf16"))
    twin = run(SDPACoreAttention(config=cfg16, layer_number=1,
                                 attn_mask_type=AttnMaskType.causal), "cuda", torch.bfloat16)
    names = ("out", "dq", "dk", "dv")
    result: dict[str, Any] = {"twin_bf16_vs_fp32": {n: rel(a, b)
                                                   for n, a, b in zip(names, twin, ref)}}
    if te_ok:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        cfg_te = build_transformer_config(model, ParallelConfig(), PrecisionConfig(
            params_dtype="bf16", transformer_impl="transformer_engine"))
        te = TEDotProductAttention(config=cfg_te, layer_number=1,
                                   attn_mask_type=AttnMaskType.causal, attention_type="self")
        got = run(te, "cuda", torch.bfloat16)
        result["te_bf16_vs_fp32"] = {n: rel(a, b) for n, a, b in zip(names, got, ref)}
    return result


@register_part("thd-documents", gpu_budget_s=50, smoke_budget_s=90,
               what="document masking: TE THD vs the CPU twin, 32K step time")
def part_thd_documents(ctx: Ctx) -> None:
    """Document masking on THD micro-batches: (1) Transformer Engine's THD attention (CP1, p2p
    path, bf16) against the CPU twin (our SDPA core attention, fp32) on one packed batch of 7
    documents (lengths 1 to 831), output and q/k/v gradients within 2e-2 relative; the twin
    in bf16 on the device is reported beside it. (2) Step time of one layer of the throughput
    shape at 32K tokens, causal over the row vs `--reset-attention-mask` (mock data's
    documents), TE spec when TE imports, else the local spec (labelled); a run that does not
    fit the time left is recorded as skipped with its estimate."""
    require_megatron()
    import torch

    if not ctx.smoke:
        require_cuda(ctx)
    from megatron_longctx.model.build import te_available

    te_ok = torch.cuda.is_available() and te_available()
    if torch.cuda.is_available():
        ctx.rec.expect("te_thd_vs_cpu_twin",
                       f"TE THD attention vs the CPU twin, out and q/k/v grads within "
                       f"{THD_ATTN_RTOL}")
        from megatron_longctx.checkpoint.model_io import single_process_group

        try:
            with single_process_group():
                cmp = _thd_attention_compare(te_ok)
        except Exception as err:
            ctx.rec.error("attention", err)
            cmp = {}
        ctx.rec.result(attention=cmp)
        if "te_bf16_vs_fp32" in cmp:
            worst = max(cmp["te_bf16_vs_fp32"].values())
            ctx.rec.check("te_thd_vs_cpu_twin", {"passed": worst <= THD_ATTN_RTOL,
                                                 "max_rel_diff": worst,
                                                 "tolerance": THD_ATTN_RTOL})
        elif not te_ok:
            ctx.rec.skip_check("te_thd_vs_cpu_twin", "transformer_engine.pytorch not importable")
        else:
            ctx.rec.missing("te_thd_vs_cpu_twin", "attention comparison failed (see errors)")
    s = ctx.shapes
    seq = THD_SEQ["smoke" if ctx.smoke else "gpu"]
    spec = (["--transformer-impl", "transformer_engine"] if te_ok
            else ["--transformer-impl", "local"])
    # Sized for a 50 s budget: 1 layer of the throughput shape, 1 warm-up + 2 timed steps.
    base = trainer_argv(preset=s.tp_preset, layers=1 if not ctx.smoke else s.tp_layers,
                        seq=seq, vocab=s.tp_vocab, gbs=1, iters=3, lr=1e-5,
                        extra=[*spec, *([] if ctx.smoke else ["--bf16"])])
    items = [("causal", base, 1, 1.0),
             ("document-masked", [*base, "--reset-attention-mask"], 1, 1.0)]
    runs: dict[str, Any] = {}
    _run_series(ctx, items, runs, oom_retry=None)
    ctx.rec.result(spec="transformer_engine" if te_ok else "local", seq=seq, runs=runs)
    causal, masked = runs.get("causal", {}), runs.get("document-masked", {})
    if causal.get("median_step_s") and masked.get("median_step_s"):
        ctx.rec.result(masked_over_causal_time=masked["median_step_s"] / causal["median_step_s"])
