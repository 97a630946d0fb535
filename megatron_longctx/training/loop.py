"""The training loop: setup -> resume -> steps (log, eval, save) -> stop condition.

`pretrain(cfg)` is all the entrypoint calls. Stop conditions, checked after every step and
agreed on by all ranks (one small all-reduce) so no rank is left waiting in a collective:

* `--train-iters` reached: final save (with --save), return 0.
* SIGTERM / SIGUSR1 with `--exit-signal-handler` (SLURM sends one before the time limit with
  `--signal=B:USR1@300`, and SIGTERM on preemption): save, return EXIT_REQUEUE (75). A signal
  that arrived before the first step (the entrypoint records them from its first line:
  training/signals.py) returns EXIT_REQUEUE without saving: nothing was trained, the loaded
  checkpoint is still the latest.
* `--exit-duration-in-mins` elapsed: save, return EXIT_REQUEUE.
* `--exit-interval`: save, return 0.
* NaN/Inf loss with `--on-nan-loss stop`: return EXIT_NAN without saving (the weights may
  already be damaged; the last good checkpoint stays the latest).

Saves: periodic saves (`--save-interval`) are asynchronous with `--async-save` (the writer runs
while the next steps train; finished saves are finalised, i.e. marked latest and retention
applied, at the first step boundary after every rank's writer is done). A save made because
the run stops (end, signal, exit duration, exit interval) first waits for a save in flight,
then is written synchronously, so the process never exits (75 included) with a checkpoint
half-written; a run that fails with an exception kills its writer instead, leaving the
previous checkpoint as the latest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megatron_longctx.config.training import (
    EXIT_NAN,
    EXIT_REQUEUE,
    PretrainConfig,
    resolve_runtime,
)
from megatron_longctx.mixture.dataset import DatasetTokenizer
from megatron_longctx.training import metrics
from megatron_longctx.training.checkpointing import (
    TrainState,
    finalize_async_saves,
    load_checkpoint,
    make_async_queue,
    save_checkpoint,
)
from megatron_longctx.training.data import (
    BatchSampler,
    build_datasets,
    prepare_microbatch,
    resolve_tokenizer,
)
from megatron_longctx.training.observability import (
    ManualGC,
    ProfilerWindow,
    StepProbe,
    init_wandb,
    params_l2_norm,
)
from megatron_longctx.training.setup import (
    build_optimizer,
    build_scheduler,
    build_training_model,
)
from megatron_longctx.training.signals import SignalFlag
from megatron_longctx.training.step import (
    NonFiniteLossError,
    comm_device,
    eval_step,
    train_step,
)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What `pretrain` returns to the entrypoint and to tests."""

    exit_code: int
    state: TrainState
    losses: list[float] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)
    reason: str = ""


def _any_rank(*flags: bool) -> list[bool]:
    """Each flag OR-ed over all ranks, in one small all-reduce."""
    value = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v) for v in value.tolist()]


def _is_logging_rank() -> bool:
    # Megatron-LM logs from the last rank: it is on the last pipeline stage, which has the loss.
    return dist.get_rank() == dist.get_world_size() - 1


def _data_position() -> tuple[int, int, int]:
    from megatron.core import parallel_state as ps

    return (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
            ps.get_context_parallel_rank())


def _prepare(batches: list[dict], cfg: PretrainConfig, eod: int) -> list[dict]:
    from megatron.core import parallel_state as ps

    cp_size = ps.get_context_parallel_world_size()
    cp_rank = ps.get_context_parallel_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else None
    return [prepare_microbatch(b, cp_size=cp_size, cp_rank=cp_rank,
                               seq_length=cfg.model.seq_length,
                               document_masking=cfg.data.reset_attention_mask, eod=eod,
                               device=device, reset_position_ids=cfg.data.reset_position_ids,
                               pad_multiple=cfg.data.document_pad_multiple)
            for b in batches]


def _thd_cost(batches: list[dict]) -> tuple[int, int]:
    """(pad, dropped) tokens of this rank's THD micro-batches (0, 0 without masking)."""
    stats = [b["thd_stats"] for b in batches if b.get("thd_stats") is not None]
    return (sum(s["pad_tokens"] for s in stats), sum(s["dropped_tokens"] for s in stats))


@dataclass
class Session:
    """Everything one run holds between steps (built by `_start`)."""

    cfg: PretrainConfig
    world: int
    data: Any
    chunks: list[Any]
    optimizer: Any
    scheduler: Any
    state: TrainState
    carried_meta: dict[str, Any]
    train_sampler: BatchSampler
    valid_sampler: BatchSampler | None
    writer: Any
    meter: Any
    flag: SignalFlag
    logging_rank: bool
    start_time: float
    thd_pad_tokens: int = 0
    thd_dropped_tokens: int = 0
    thd_row_tokens: int = 0
    async_queue: Any = None
    probe: StepProbe | None = None
    profiler: ProfilerWindow | None = None
    gc: ManualGC | None = None


def _start(cfg: PretrainConfig, world: int, tokenizer: DatasetTokenizer | None) -> Session:
    """Resolve the config (a new object), build data, model, optimizer; load; samplers."""
    from megatron_longctx.model.build import te_available, te_version

    start_time = time.time()
    tokenizer = tokenizer or resolve_tokenizer(cfg)
    have_te = te_available()
    cfg = resolve_runtime(cfg, te_available=have_te, tokenizer_vocab=tokenizer.vocab_size)
    cfg.validate(world, te_available=have_te, te_version=te_version() if have_te else None)
    gbs = cfg.global_batch_size(world)
    data = build_datasets(cfg, world, tokenizer)
    chunks = build_training_model(cfg)
    optimizer = build_optimizer(cfg, chunks)
    scheduler = build_scheduler(cfg, optimizer, gbs)
    state, carried_meta = TrainState(), {}
    if cfg.checkpoint.load:
        loaded = load_checkpoint(cfg.checkpoint.load, chunks, optimizer, scheduler, cfg)
        if loaded is not None:
            state, carried_meta = loaded
        elif dist.get_rank() == 0:
            print(f"[load] no checkpoint in --load {cfg.checkpoint.load}; starting from "
                  "scratch", flush=True)
    dp_rank, dp_size, _ = _data_position()
    mbs = cfg.training.micro_batch_size
    train_sampler = BatchSampler(data.train, mbs, dp_rank, dp_size,
                                 state.consumed_train_samples)
    valid_sampler = BatchSampler(data.valid, mbs, dp_rank, dp_size,
                                 state.consumed_valid_samples) if data.valid is not None else None
    logging_rank = _is_logging_rank()
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    # MFU against the bf16 peak, FP8 runs included (metrics.peak_tflops).
    peak = metrics.peak_tflops(device_name, cfg.precision.params_dtype, False,
                               override=cfg.logging.peak_tflops)
    seq = cfg.model.seq_length
    meter = metrics.ThroughputMeter(gbs * seq, world, metrics.flops_per_token(cfg.model, seq),
                                    peak)
    lg = cfg.logging
    writer = metrics.MetricsWriter(lg.tensorboard_dir, logging_rank,
                                   wandb_run=init_wandb(cfg, logging_rank))
    run = Session(cfg, world, data, chunks, optimizer, scheduler, state, carried_meta,
                  train_sampler, valid_sampler, writer, meter, SignalFlag(), logging_rank,
                  start_time)
    run.async_queue = make_async_queue() if cfg.checkpoint.async_save else None
    if lg.log_timers_to_tensorboard or lg.log_num_zeros_in_grad:
        run.probe = StepProbe(optimizer, lg.log_num_zeros_in_grad)
    run.profiler = ProfilerWindow(cfg, dist.get_rank())
    return run


def pretrain(cfg: PretrainConfig, *, world_size: int | None = None,
             tokenizer: DatasetTokenizer | None = None,
             signal_flag: SignalFlag | None = None) -> RunResult:
    """Run training as configured; process groups must already be initialised.

    `cfg` is not modified: the run works on `resolve_runtime(cfg, ...)` (the tokenizer's
    vocabulary, the transformer implementation), a new config; `tokenizer` saves reading the
    tokenizer again when the caller (the entrypoint) already resolved it. `signal_flag`: the
    entrypoint's already-installed flag (signals recorded since process start), kept installed
    after the run; without it the run installs its own (with --exit-signal-handler) and
    restores the previous handlers at the end.
    """
    run = _start(cfg, world_size or dist.get_world_size(), tokenizer)
    own_flag = signal_flag is None
    if not own_flag:
        run.flag = signal_flag
    elif run.cfg.training.exit_signal_handler:
        run.flag.install()
    result = RunResult(exit_code=0, state=run.state)
    run.gc = ManualGC(run.cfg)
    try:
        _run_steps(run, result)
        finalize_async_saves(run.async_queue, blocking=True)
    except BaseException:
        _abort_async_saves(run.async_queue)
        raise
    finally:
        run.profiler.close()
        run.gc.close()
        if own_flag:
            run.flag.restore()
        run.writer.close()
        result.state = run.state
    return result


def _run_steps(run: Session, result: RunResult) -> None:
    if _signalled_before_training(run, result):
        return
    while run.state.iteration < run.cfg.training.train_iters:
        if not _train_one(run, result) or _after_step(run, result):
            return
    result.reason = "done"


def _abort_async_saves(async_queue: Any) -> None:
    """Kill the writers of unfinished saves (no collective: other ranks may be gone); their
    iteration directories stay unmarked and the previous checkpoint stays the latest."""
    if async_queue is None:
        return
    for call in async_queue.async_calls:
        call.async_caller.close(abort=True)
    async_queue.async_calls.clear()


def _signalled_before_training(run: Session, result: RunResult) -> bool:
    """A signal recorded during start-up (all ranks agree): exit for requeue, no save."""
    if not run.cfg.training.exit_signal_handler:
        return False
    (signalled,) = _any_rank(run.flag.received is not None)
    if not signalled:
        return False
    if run.logging_rank:
        print(f"[exit] signal before the first step (iteration {run.state.iteration}): "
              f"nothing trained, no checkpoint written, exit code {EXIT_REQUEUE} (requeue to "
              "continue)", flush=True)
    result.exit_code, result.reason = EXIT_REQUEUE, "signal-before-training"
    return True


def _train_one(run: Session, result: RunResult) -> bool:
    """One optimizer step with logging; False when a non-finite loss stops the run."""
    cfg, state = run.cfg, run.state
    n_micro, gbs = cfg.num_microbatches(run.world), cfg.global_batch_size(run.world)
    step_start = time.time()
    try:
        with run.profiler.step(state.iteration):
            batches = _prepare(run.train_sampler.next_step(n_micro), cfg,
                               run.data.tokenizer.eod)
            batch_seconds = time.time() - step_start
            pads, dropped = _thd_cost(batches)
            run.thd_pad_tokens += pads
            run.thd_dropped_tokens += dropped
            run.thd_row_tokens += (len(batches) * cfg.training.micro_batch_size
                                   * cfg.model.seq_length)
            step = train_step(run.chunks, run.optimizer, run.scheduler, batches,
                              seq_length=cfg.model.seq_length,
                              micro_batch_size=cfg.training.micro_batch_size,
                              global_batch_size=gbs, domain_names=run.data.domain_names,
                              on_nan_loss=cfg.training.on_nan_loss)
    except NonFiniteLossError as err:
        log.error("iteration %d: %s; stopping", state.iteration + 1, err)
        if run.logging_rank:
            print(f"[error] iteration {state.iteration + 1}: {err}", flush=True)
        result.exit_code, result.reason = EXIT_NAN, "nan"
        return False
    state.iteration += 1
    state.consumed_train_samples = run.train_sampler.consumed_samples
    state.skipped_iterations += int(step.skipped)
    state.nan_iterations += int(step.nan)
    result.losses.append(step.loss)
    result.grad_norms.append(step.grad_norm)
    elapsed = time.time() - step_start
    if state.iteration % cfg.logging.log_interval == 0 or \
            state.iteration == cfg.training.train_iters:
        extra = _optional_series(run, elapsed, batch_seconds)
        _log_step(run.writer, run.meter, state, step, run.scheduler, elapsed, gbs, cfg,
                  run.logging_rank, extra)
        if cfg.data.reset_attention_mask and run.thd_row_tokens:
            _log_thd_cost(run, state.iteration)
    return True


def _log_thd_cost(run: Session, iteration: int) -> None:
    """Pad and dropped tokens of THD packing so far (this DP rank's rows; every rank reads
    the same kind of data, so its shares are the run's)."""
    share_pad = run.thd_pad_tokens / run.thd_row_tokens
    share_drop = run.thd_dropped_tokens / run.thd_row_tokens
    run.writer.add_scalars(iteration, {"thd-pad-fraction": share_pad,
                                       "thd-dropped-fraction": share_drop})
    if run.logging_rank:
        print(f" document masking (THD): {run.thd_pad_tokens} pad and "
              f"{run.thd_dropped_tokens} dropped tokens of {run.thd_row_tokens} "
              f"({100 * share_pad:.2f}% pad, {100 * share_drop:.2f}% dropped) on this rank",
              flush=True)


def _optional_series(run: Session, elapsed: float, batch_seconds: float) -> dict[str, Any]:
    """The flag-enabled series of one logged step (training/metrics.py lists the tags).
    Collective with --log-params-norm (every rank logs the same iterations)."""
    lg, values = run.cfg.logging, {}
    if lg.log_throughput:
        values[metrics.TAG_THROUGHPUT] = run.meter.update(elapsed)["tflops_per_device"]
    if lg.log_memory_to_tensorboard:
        values.update(metrics.memory_series())
    if lg.log_timers_to_tensorboard:
        optimizer = run.probe.seconds
        values[metrics.TIMER_TAGS["forward-backward"]] = elapsed - batch_seconds - optimizer
        values[metrics.TIMER_TAGS["optimizer"]] = optimizer
        values[metrics.TIMER_TAGS["batch-generator"]] = batch_seconds
    if lg.log_params_norm:
        values[metrics.TAG_PARAMS_NORM] = params_l2_norm(run.chunks)
    if lg.log_num_zeros_in_grad:
        values[metrics.TAG_NUM_ZEROS] = run.probe.num_zeros
    return values


def _after_step(run: Session, result: RunResult) -> bool:
    """Validation, saves and the stop conditions; True when the run stops here."""
    cfg, state = run.cfg, run.state
    finalize_async_saves(run.async_queue, blocking=False)
    if run.valid_sampler is not None and cfg.training.eval_interval and \
            state.iteration % cfg.training.eval_interval == 0:
        run.gc.around_validation()
        loss = _evaluate(run.chunks, run.valid_sampler, cfg,
                         cfg.num_microbatches(run.world), run.data)
        run.gc.around_validation()
        state.consumed_valid_samples = run.valid_sampler.consumed_samples
        result.eval_losses.append(loss)
        ppl = metrics.validation_ppl(loss)
        run.writer.add_scalars(state.iteration, {metrics.TAG_VALID_LOSS: loss,
                                                 metrics.TAG_VALID_PPL: ppl})
        if run.logging_rank:
            print(f" validation loss at iteration {state.iteration} | lm loss: "
                  f"{loss:.6E} | lm loss PPL: {ppl:.6E} |", flush=True)
    limit = cfg.training.exit_duration_in_mins
    signalled, timed_out = _any_rank(
        run.flag.received is not None,
        limit is not None and time.time() - run.start_time > 60 * limit)
    interval = (cfg.training.exit_interval is not None
                and state.iteration % cfg.training.exit_interval == 0)
    done = state.iteration >= cfg.training.train_iters
    save = cfg.checkpoint.save
    periodic = (save and cfg.checkpoint.save_interval
                and state.iteration % cfg.checkpoint.save_interval == 0)
    stopping = signalled or timed_out or interval or done
    if save and (periodic or stopping):
        save_start = time.time()
        if stopping:  # the last save of this process: wait for one in flight, then write
            finalize_async_saves(run.async_queue, blocking=True)
        save_checkpoint(save, state, run.chunks, run.optimizer, run.scheduler, cfg,
                        run.carried_meta, async_queue=None if stopping else run.async_queue)
        if cfg.logging.log_timers_to_tensorboard:
            run.writer.add_scalars(state.iteration, {
                metrics.TIMER_TAGS["save-checkpoint"]: time.time() - save_start})
    run.gc.after_step(state.iteration)
    if signalled or timed_out:
        reason = "signal" if signalled else "exit-duration"
        if run.logging_rank:
            print(f"[exit] {reason} at iteration {state.iteration}: checkpoint saved, "
                  f"exit code {EXIT_REQUEUE} (requeue to continue)", flush=True)
        result.exit_code, result.reason = EXIT_REQUEUE, reason
        return True
    if interval and not done:
        result.reason = "exit-interval"
        return True
    return False


def _evaluate(chunks: list[Any], sampler: BatchSampler, cfg: PretrainConfig, n_micro: int,
              data: Any) -> float:
    total, tokens = 0.0, 0
    for _ in range(cfg.training.eval_iters):
        batches = _prepare(sampler.next_step(n_micro), cfg, data.tokenizer.eod)
        step = eval_step(chunks, batches, seq_length=cfg.model.seq_length,
                         micro_batch_size=cfg.training.micro_batch_size,
                         domain_names=data.domain_names)
        total += step.loss * step.tokens
        tokens += step.tokens
    return total / tokens if tokens else float("nan")


def _log_step(writer: Any, meter: Any, state: TrainState, step: Any, scheduler: Any,
              elapsed: float, gbs: int, cfg: PretrainConfig, logging_rank: bool,
              extra: dict[str, Any] | None = None) -> None:
    lr = scheduler.optimizer.param_groups[0]["lr"]
    values: dict[str, Any] = {
        metrics.TAG_LM_LOSS: step.loss,
        metrics.TAG_LEARNING_RATE: lr,
        metrics.TAG_GRAD_NORM: step.grad_norm,
        metrics.TAG_ITERATION_TIME: elapsed,
    }
    throughput, memory = meter.update(elapsed), metrics.memory_stats()
    for key, tag in metrics.THROUGHPUT_TAGS.items():
        values[tag] = throughput.get(key)
    if step.document_square_tokens is not None:
        # Document masking: attention FLOPs follow the documents; the tags say so and the
        # s^2 count is not logged (it would overstate the work ~n_docs times).
        flops = metrics.document_masked_flops(cfg.model, gbs * cfg.model.seq_length,
                                              step.document_square_tokens)
        masked = meter.update(elapsed, flops)
        del values[metrics.TAG_TFLOPS_PER_DEVICE], values[metrics.TAG_MFU]
        values[metrics.TAG_TFLOPS_DOCUMENT_MASKED] = masked["tflops_per_device"]
        values[metrics.TAG_MFU_DOCUMENT_MASKED] = masked["mfu"]
    for key, tag in metrics.MEMORY_TAGS.items():
        values[tag] = memory.get(key)
    for name, loss in step.domain_losses.items():
        values[metrics.domain_loss_tag(name)] = loss
    values.update(extra or {})
    writer.add_scalars(state.iteration, values)
    if logging_rank:
        console = dict(values)
        console[metrics.KEY_CONSUMED_SAMPLES] = state.consumed_train_samples
        console[metrics.KEY_GLOBAL_BATCH_SIZE] = gbs
        console[metrics.KEY_SKIPPED_ITERATIONS] = state.skipped_iterations
        console[metrics.KEY_NAN_ITERATIONS] = state.nan_iterations
        print(metrics.format_console_line(state.iteration, cfg.training.train_iters, console),
              flush=True)
