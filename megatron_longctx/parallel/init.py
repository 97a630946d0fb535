"""Process-group initialisation from torchrun or SLURM, then megatron's parallel state.

Order (one function, one early check): read rank/world from the environment -> check that the
world divides into TP x PP x CP replicas (before any collective, so a wrong flag fails in
milliseconds with the formula instead of hanging in NCCL) -> CPU patches when there is no CUDA
-> torch.distributed.init_process_group (nccl on CUDA, else gloo) ->
parallel_state.initialize_model_parallel -> seeds.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megatron_longctx.config.model import ParallelConfig
from megatron_longctx.parallel.cpu_compat import apply_cpu_patches


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, world size, local rank and rendezvous address."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str


def _first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist like 'gpu[003-005,010],cpu1' (no scontrol needed)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]\-,]+))?", nodelist)
    if match is None:
        return nodelist
    return match.group(1) + (match.group(2) or "")


def free_port() -> int:
    """A TCP port nothing listens on right now (bind to port 0 and release it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_dist_env(env: dict[str, str] | None = None) -> DistEnv:
    """Rank and rendezvous from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or SLURM (SLURM_PROCID/
    SLURM_NTASKS/SLURM_LOCALID); neither means a single process.

    MASTER_ADDR defaults to the first host of SLURM_JOB_NODELIST (or localhost); MASTER_PORT to
    29500 for torchrun, a free port for a single process (SLURM: 20000 + job id % 10000, so
    concurrent jobs on a node do not collide).
    """
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        source = "torchrun"
        default_addr, default_port = "127.0.0.1", 29500
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        source = "slurm"
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        default_addr = _first_slurm_host(nodes)
        default_port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000
    else:
        # One process: any free port (no peer needs to find it), so concurrent single-process
        # runs on a machine (tests, demo, tools) never collide on a fixed one.
        rank, world, local, source = 0, 1, 0, "single"
        default_addr, default_port = "127.0.0.1", free_port() if "MASTER_PORT" not in env else 0
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world} ({source} environment)")
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=local,
        master_addr=env.get("MASTER_ADDR", default_addr),
        master_port=int(env.get("MASTER_PORT", default_port)),
        source=source,
    )


def initialize_distributed(
    parallel: ParallelConfig,
    *,
    seed: int = 1234,
    env: dict[str, str] | None = None,
    timeout_minutes: int = 30,
    backend: str | None = None,
) -> DistEnv:
    """Initialise torch.distributed and megatron's model-parallel groups.

    Args:
        parallel: TP/PP/VPP/CP sizes (validated against the world size first).
        seed: base seed; each PP stage gets seed + 100 * pp_rank, as Megatron-LM does, and the
            CPU generator is seeded too (megatron seeds only CUDA's).
        env: environment to read instead of os.environ (tests).
        timeout_minutes: collective timeout.
        backend: override (default nccl with CUDA, gloo without).

    Returns:
        The environment this process was started in.
    """
    denv = read_dist_env(env)
    parallel.validate(world_size=denv.world_size)
    # before set_device creates the CUDA context
    set_cuda_connections(parallel.tensor_model_parallel_size, parallel.context_parallel_size)
    apply_cpu_patches()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"),
            init_method=f"tcp://{denv.master_addr}:{denv.master_port}",
            rank=denv.rank,
            world_size=denv.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    initialize_model_parallel(parallel)
    set_seed(seed)
    return denv


def set_cuda_connections(tensor_model_parallel_size: int, context_parallel_size: int,
                         environ: Any = None) -> None:
    """Export CUDA_DEVICE_MAX_CONNECTIONS=1 with TP > 1 or CP > 1 (unless already set).

    TE asserts one hardware work queue when it overlaps TP/CP communication with GEMMs, and
    Megatron-LM's launch scripts export it. The driver reads the variable when the CUDA
    context is created, so this must run before any CUDA call of the process (torch.cuda.
    set_device, importing Transformer Engine): the entrypoint calls it right after parsing the
    flags, and `initialize_distributed` again for library users (a no-op the second time).
    """
    environ = os.environ if environ is None else environ
    if tensor_model_parallel_size > 1 or context_parallel_size > 1:
        environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def initialize_model_parallel(parallel: ParallelConfig) -> None:
    """megatron parallel_state.initialize_model_parallel with our config (idempotent re-init)."""
    from megatron.core import parallel_state

    parallel.validate(world_size=dist.get_world_size())
    release_model_parallel()
    vpp = parallel.virtual_pipeline_model_parallel_size
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        context_parallel_size=parallel.context_parallel_size,
        hierarchical_context_parallel_sizes=(list(parallel.hierarchical_context_parallel_sizes)
                                             if parallel.hierarchical_context_parallel_sizes
                                             else None),
    )


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch CPU and megatron's model-parallel RNG tracker.

    PP stages get different seeds (seed + 100 * pp_rank), as in Megatron-LM's _set_random_seed;
    TP ranks get distinct dropout streams through the tracker (seed + 2718 + tp_rank).
    """
    import random

    import numpy as np
    from megatron.core import parallel_state, tensor_parallel

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    apply_cpu_patches()  # no-op with CUDA; on CPU the tracker below needs the CPU generator
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group."""
    release_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def release_model_parallel() -> None:
    """megatron's destroy_model_parallel, plus the two groups it forgets (0.16.1).

    destroy_model_parallel leaves `_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP` and its gloo
    twin set. A process that forks ranks afterwards (tests/distributed/spawn.py) hands the
    children a ProcessGroupGloo whose worker threads exist only in the parent; the child's next
    initialize_model_parallel drops that reference, the destructor joins the missing threads and
    the child dies with "std::system_error: Invalid argument" (seen as a hang of the other
    ranks). Releasing them here, in the process that owns the threads, avoids it.
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    for name in ("_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP",
                 "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP_GLOO"):
        if hasattr(parallel_state, name):
            setattr(parallel_state, name, None)
