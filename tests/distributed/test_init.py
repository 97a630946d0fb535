"""Process-group initialisation: env parsing (torchrun, SLURM), the early divisibility check,
and a full initialize_distributed in spawned ranks."""

from __future__ import annotations

import pytest

from megatron_longctx.config.model import ParallelConfig
from megatron_longctx.parallel.init import initialize_distributed, read_dist_env
from tests.distributed.spawn import free_port, run_distributed


def test_torchrun_env() -> None:
    env = read_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                         "MASTER_ADDR": "node7", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (3, 8, 1, "torchrun")
    assert (env.master_addr, env.master_port) == ("node7", 1234)


def test_slurm_env_defaults_master_from_nodelist() -> None:
    env = read_dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                         "SLURM_JOB_NODELIST": "gpu[012-013,020]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (5, 16, 5, "slurm")
    assert env.master_addr == "gpu012" and env.master_port == 24242


def test_single_process_default() -> None:
    assert read_dist_env({}).world_size == 1


def test_world_not_divisible_fails_before_any_collective() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "6"}
    with pytest.raises(ValueError, match=r"world size \(6\) must be divisible by "
                       r"--tensor-model-parallel-size \(2\) x --pipeline-model-parallel-size "
                       r"\(1\) x --context-parallel-size \(2\) = 4"):
        initialize_distributed(ParallelConfig(tensor_model_parallel_size=2,
                                              context_parallel_size=2), env=env)


def _init(rank: int, world: int, port: int) -> dict:
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dist.destroy_process_group()  # start from a bare process, as under torchrun
    env = dict(os.environ, MASTER_PORT=str(port))
    initialize_distributed(ParallelConfig(tensor_model_parallel_size=2,
                                          context_parallel_size=2), env=env)
    return {"tp": ps.get_tensor_model_parallel_rank(), "cp": ps.get_context_parallel_rank(),
            "dp": ps.get_data_parallel_world_size()}


def test_initialize_distributed_builds_groups() -> None:
    ranks = run_distributed(_init, 4, free_port())
    assert sorted((r["tp"], r["cp"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["dp"] == 1 for r in ranks)
