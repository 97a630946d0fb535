"""What a long run reports besides its loss: timers, parameter norm, zero gradients, the
profiler window, W&B, and Python's garbage collector (Megatron-LM's flags and series).

Each piece is off unless its flag is given and costs nothing then:

* `StepProbe` wraps the optimizer's `step` to time it and keep its zero-gradient count
  (megatron-core computes it inside `step()` when `log_num_zeros_in_grad` is set; the count
  needs one all-reduce over the model-parallel group).
* `params_l2_norm`: the L2 norm of all parameters of the model replica, each counted once
  (tensor-parallel duplicates such as RMSNorm weights and the pipeline-shared embedding copy
  are skipped), summed over the TP and PP groups: one all-reduce of one float each.
* `ProfilerWindow`: steps whose iteration count before the step lies in
  [--profile-step-start, --profile-step-end), on --profile-ranks only. With
  --use-pytorch-profiler a torch.profiler session starts at the first step of the window and
  stops after the last, so the other steps run without profiler hooks; the trace is written to
  --tensorboard-dir as `rank{R}.*.pt.trace.json` (TensorBoard's profiler plugin and Perfetto
  read it). Without it, on CUDA, `cudaProfilerStart/Stop` bound the window for
  `nsys profile --capture-range=cudaProfilerApi` and `emit_nvtx` adds the op ranges
  (Megatron-LM's behaviour); on CPU there is nothing for nsys to capture and a note says so.
* `ManualGC`: `--manual-gc` disables the automatic collector (its pauses land at different
  moments on different ranks and stall the collectives of all; Megatron-LM measured this at
  scale) and collects at the same steps everywhere: every --manual-gc-interval steps and,
  unless --no-manual-gc-eval, before and after validation.
* `init_wandb`: a W&B run on the logging rank (the last, as Megatron-LM), `WANDB_MODE=offline`
  honoured (the run directory is later uploaded with `wandb sync`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_longctx.config.training import PretrainConfig

log = logging.getLogger(__name__)


class StepProbe:
    """Wraps `optimizer.step` (instance attribute, so megatron's schedule and our step call
    it unchanged) and records the time it took and the zero-gradient count it returned."""

    def __init__(self, optimizer: Any, count_zeros: bool) -> None:
        self.seconds = 0.0
        self.num_zeros: float | None = None
        if count_zeros:
            inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
            for opt in [optimizer, *inner]:
                if getattr(opt, "config", None) is not None:
                    opt.config.log_num_zeros_in_grad = True
        original = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self.seconds = time.perf_counter() - start
            if isinstance(out, tuple) and len(out) == 3:
                self.num_zeros = None if out[2] is None else float(out[2])
            return out

        optimizer.step = step


def params_l2_norm(model_chunks: list[Any]) -> float:
    """L2 norm of the whole model's parameters, identical on every rank.

    Each parameter counted once: tensor-parallel duplicates (`param_is_not_tensor_parallel_
    duplicate`) and the second copy of a pipeline-shared embedding (`param_is_not_shared`)
    are skipped; sums of squares are added over the TP group, then the PP group. Data- and
    context-parallel ranks hold the same parameters and are not summed.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    from megatron_longctx.model.build import unwrap_model
    from megatron_longctx.training.step import comm_device

    total = torch.zeros(1, dtype=torch.float64, device=comm_device())
    for chunk in model_chunks:
        for param in unwrap_model(chunk).parameters():
            if param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param):
                total += param.detach().double().pow(2).sum().to(total.device)
    for group in (ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
    return float(total.sqrt())


class ProfilerWindow:
    """--profile: the window of steps, on the chosen ranks (module docstring)."""

    def __init__(self, cfg: PretrainConfig, rank: int) -> None:
        lg = cfg.logging
        self.enabled = lg.profile and rank in lg.profile_ranks
        self.start, self.end = lg.profile_step_start, lg.profile_step_end
        self.torch_profiler = lg.use_pytorch_profiler
        self.trace_dir = lg.tensorboard_dir
        self.rank = rank
        self._prof: Any = None
        self._nsys = False
        self._nvtx: Any = None
        if self.enabled and not self.torch_profiler and not torch.cuda.is_available():
            log.warning("--profile without --use-pytorch-profiler marks nsys ranges on CUDA "
                        "only; nothing is profiled on CPU")
            self.enabled = False

    @contextlib.contextmanager
    def step(self, iteration: int) -> Iterator[None]:
        """Around one training step; `iteration` is the count before the step."""
        if not self.enabled or not self.start <= iteration < self.end:
            yield
            return
        if self._prof is None and not self._nsys:
            self._begin()
        if self._prof is not None:
            with torch.profiler.record_function(f"iteration-{iteration}"):
                yield
        else:
            torch.cuda.nvtx.range_push(f"iteration-{iteration}")
            try:
                yield
            finally:
                torch.cuda.nvtx.range_pop()
        if iteration + 1 >= self.end:
            self.close()

    def _begin(self) -> None:
        if self.torch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self._prof.start()
        else:
            torch.cuda.cudart().cudaProfilerStart()
            self._nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self._nvtx.__enter__()
            self._nsys = True

    def close(self) -> None:
        """End the window (also when the run stops inside it); writes the trace."""
        if self._prof is not None:
            self._prof.stop()
            handler = torch.profiler.tensorboard_trace_handler(
                self.trace_dir, worker_name=f"rank{self.rank}")
            handler(self._prof)
            self._prof = None
        elif self._nsys:
            self._nvtx.__exit__(None, None, None)
            torch.cuda.cudart().cudaProfilerStop()
            self._nsys = False
        self.enabled = False


class ManualGC:
    """--manual-gc / --manual-gc-interval / --no-manual-gc-eval (module docstring)."""

    def __init__(self, cfg: PretrainConfig) -> None:
        tr = cfg.training
        self.enabled, self.interval, self.around_eval = (tr.manual_gc, tr.manual_gc_interval,
                                                         tr.manual_gc_eval)
        self._was_enabled = gc.isenabled()
        if self.enabled:
            gc.disable()
            gc.collect()

    def after_step(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    def around_validation(self) -> None:
        if self.enabled and self.around_eval:
            gc.collect()

    def close(self) -> None:
        if self.enabled and self._was_enabled:
            gc.enable()


def init_wandb(cfg: PretrainConfig, logging_rank: bool) -> Any | None:
    """The W&B run (logging rank, --wandb-project given), or None.

    Directory: --wandb-save-dir, else SAVE/wandb, else ./wandb (Megatron-LM's default is
    SAVE/wandb too). The run's config is the resolved PretrainConfig.
    """
    lg = cfg.logging
    if not (logging_rank and lg.wandb_project):
        return None
    import dataclasses

    import wandb

    save_dir = lg.wandb_save_dir or (os.path.join(cfg.checkpoint.save, "wandb")
                                     if cfg.checkpoint.save else "wandb")
    os.makedirs(save_dir, exist_ok=True)
    return wandb.init(project=lg.wandb_project, name=lg.wandb_exp_name, entity=lg.wandb_entity,
                      dir=save_dir, config=dataclasses.asdict(cfg))
