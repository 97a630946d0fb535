"""The one multi-process helper: run a function in N gloo ranks and collect per-rank results.

Ranks are forked from the test process after `megatron.core` is imported here (importing it
costs ~6 s per process; a fork shares the parent's modules for free). Each rank gets
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (a free port), an initialised gloo default
group, and one torch thread (tiny models; N ranks on 2 cores would otherwise oversubscribe).
A failing rank's traceback is re-raised in the test; hung ranks are killed after `timeout`.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import traceback
from collections.abc import Callable
from typing import Any

import megatron.core  # noqa: F401  (imported before forking: ~6 s saved per rank)
import torch
import torch.distributed as dist

from megatron_longctx.parallel.cpu_compat import apply_cpu_patches
from megatron_longctx.parallel.init import free_port  # noqa: F401  (tests import it from here)

apply_cpu_patches()


def _pack(result: Any) -> bytes:
    """The result as bytes. Tensors put on a multiprocessing queue directly travel as shared-
    memory file descriptors that the parent fetches from the child's resource-sharer thread
    when it unpickles: if the child has exited by then (it exits right after putting), the
    parent gets ConnectionResetError (seen under load). torch.save copies the data instead."""
    buffer = io.BytesIO()
    torch.save(result, buffer)
    return buffer.getvalue()


def _unpack(payload: bytes) -> Any:
    return torch.load(io.BytesIO(payload), weights_only=False)


def _child(fn: Callable[..., Any], rank: int, world_size: int, port: int, queue: Any,
           args: tuple, kwargs: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                init_method=f"tcp://127.0.0.1:{port}")
        result = fn(rank, world_size, *args, **kwargs)
        queue.put((rank, True, _pack(result)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            # Flush the queue's feeder thread before the hard exit (os._exit skips atexit and
            # would drop a large result still in the buffer).
            queue.close()
            queue.join_thread()
            os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any,
                    timeout: float = 120.0, **kwargs: Any) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` in `world_size` forked gloo ranks.

    Returns:
        The per-rank return values (must be picklable), in rank order.

    Raises:
        RuntimeError: with the first failing rank's traceback, or naming the ranks that did not
            answer within `timeout` seconds.
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    # Not daemonic: dist_checkpointing's writer forks worker processes, which daemonic
    # processes may not do. Hung ranks are still killed below.
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, queue, args, kwargs),
                         daemon=False) for r in range(world_size)]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    try:
        while len(results) < world_size:
            try:
                rank, ok, payload = queue.get(timeout=timeout)
            except Exception as err:
                missing = sorted(set(range(world_size)) - set(results))
                raise RuntimeError(
                    f"ranks {missing} of {world_size} gave no result within {timeout:.0f} s"
                ) from err
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            results[rank] = _unpack(payload)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [results[r] for r in range(world_size)]
