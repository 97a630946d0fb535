"""Settings of the layout planner (`--dry-run` of pretrain_longctx.py, tools/plan_layout.py).

No I/O; each field declares its flag (config/flags.py). The planner itself is
megatron_longctx/plan/.

Attributes:
    dry_run: `--dry-run`: print the memory and time estimate of the run's own flags and exit
        (0 when it fits `--gpu-memory-gb`, 4 when it does not) before any process group or
        model exists.
    gpu_memory_gb: usable memory per GPU, GB (10^9 bytes; H100: 80).
    plan_world_size: GPUs of the run for the estimate (default: the launcher's world size,
        SLURM_NTASKS / WORLD_SIZE).
    mfu: assumed model FLOPs utilisation for the time estimate (default: the NeMo LLaMA-2 7B
        128K anchor, plan/search.py).
    token_budget: tokens to train, for the days estimate (the paper: 5B).
    allocator_margin: fraction of the estimate added for the caching allocator (plus a fixed
        2.5 GiB for CUDA context and workspaces on GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_longctx.config.flags import Flag, option


@dataclass
class PlanConfig:
    """The planner's flags (see the module docstring)."""

    dry_run: bool = option(False, Flag(
        "--dry-run", "print the memory/time estimate of these flags and exit (0 fits, 4 "
        "over --gpu-memory-gb) without starting a process group", group="plan"))
    gpu_memory_gb: float = option(80.0, Flag(
        "--gpu-memory-gb", "usable memory per GPU in GB for the estimate", group="plan"))
    plan_world_size: int | None = option(None, Flag(
        "--plan-world-size", "GPUs of the run for --dry-run (default: the launcher's world "
        "size)", group="plan"))
    mfu: float | None = option(None, Flag(
        "--mfu", "assumed MFU for the time estimate (default 0.327: NeMo LLaMA-2 7B 128K on "
        "H100)", group="plan"))
    token_budget: float = option(5e9, Flag(
        "--token-budget", "tokens to train, for the days estimate", group="plan"))
    allocator_margin: float | None = option(None, Flag(
        "--allocator-margin", "fraction of the estimate added for the allocator (default 0.08 "
        "on GPUs, 0 on CPU; plus 2.5 GiB fixed on GPUs)", group="plan"))

    def validate(self) -> None:
        if self.gpu_memory_gb <= 0:
            raise ValueError(f"--gpu-memory-gb must be positive, got {self.gpu_memory_gb}")
        if self.plan_world_size is not None and self.plan_world_size < 1:
            raise ValueError(f"--plan-world-size must be >= 1, got {self.plan_world_size}")
        if self.mfu is not None and not 0 < self.mfu <= 1:
            raise ValueError(f"--mfu must be in (0, 1], got {self.mfu}")
        if self.allocator_margin is not None and self.allocator_margin < 0:
            raise ValueError(f"--allocator-margin must be >= 0, got {self.allocator_margin}")
