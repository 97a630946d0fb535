"""Make megatron-core 0.16.1 run on CPU with gloo: targeted, idempotent patches.

megatron-core assumes CUDA at about 30 call sites (device="cuda" literals,
`torch.cuda.current_device()`, `.cuda()`, the CUDA RNG tracker). Two ways to run it on CPU:

* a torch function mode that maps device "cuda" to CPU: catches everything, but costs ~2 us per
  op on every op of every step;
* targeted patches of the call sites a run actually reaches (this module): zero per-op cost,
  and each patch is listed here with the 0.16.1 call site it exists for.

`apply_cpu_patches()` does nothing when CUDA is available (GPU runs use megatron unchanged) and
is idempotent. Patches are grouped; `PATCH_GROUPS` maps a group name to its appliers, each
listing the 0.16.1 call sites it exists for. The groups, all applied by default:

* "device": `torch.cuda.current_device` -> CPU device.
* "rng": a CPU RNG tracker for `model_parallel_cuda_manual_seed` / `get_cuda_rng_tracker`, and a
  seed wrapper that also seeds the CPU generator (megatron seeds only the CUDA one, so CPU
  initialisation was otherwise unseeded: a silent source of run-to-run differences).
* "model": CUDA literals in the model path (RoPE CP slicing, default causal mask).
* "optimizer": `device="cuda"` literals of the optimizer, grad scaler, gradient clipping and
  gradient buffers, and `torch.cuda.empty_cache`.
* "pipeline": the schedules' `total_num_tokens` CUDA tensors and the p2p
  `torch.cuda.synchronize()` calls.
* "checkpoint": dist_checkpointing's async filesystem writer (`torch.cuda.synchronize()`
  before staging, and its spawn-context result queue, replaced by a fork-context one that
  synchronous and --async-save writers both fill).

Together they run GPTModel training with TP, PP (virtual stages), CP, SP, DP with the
distributed optimizer, activation recompute and dist checkpoints on gloo.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

_APPLIED: set[str] = set()
_CPU = torch.device("cpu")


def _cpu_current_device() -> torch.device:
    """Stand-in for torch.cuda.current_device(): megatron passes its result as `device=`."""
    return _CPU


# --------------------------------------------------------------------------------------------
# group "device"
# --------------------------------------------------------------------------------------------
def _patch_current_device() -> None:
    # torch.cuda.current_device() is the device argument of ~20 allocations on the forward /
    # backward path in 0.16.1: tensor_parallel/mappings.py (_gather_along_first_dim,
    # _reduce_scatter_along_first_dim, all-to-all), tensor_parallel/layers.py (weight allocation
    # without use_cpu_initialization, SP all-gather buffers in
    # LinearWithGradAccumulationAndAsyncCommunication), tensor_parallel/utils.py
    # (split/gather_tensor_into_1d), transformer/attention.py:430 (inference buffers),
    # transformer/transformer_layer.py:936/1147, models/gpt/gpt_model.py:415,
    # models/common/embeddings/rotary_pos_embedding.py:78/162/297. On a CPU-only torch the real
    # function raises "Torch not compiled with CUDA enabled". One global patch covers them all.
    torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------
# group "rng"
# --------------------------------------------------------------------------------------------
def _make_cpu_tracker_class() -> type:
    from megatron.core.tensor_parallel import random as mrandom

    base = mrandom.CudaRNGStatesTracker
    if getattr(base, "_megatron_longctx_cpu", False):
        return base

    class CpuRNGStatesTracker(base):  # type: ignore[valid-type, misc]
        """Megatron's RNG tracker backed by CPU generator states.

        Same bookkeeping as CudaRNGStatesTracker (named states, unique seeds, nested forks);
        `add` and `fork` swap the CPU default generator's state instead of the CUDA one. The
        upstream fork also warns whenever the CPU state changes inside a fork, which here is
        every fork that draws random numbers, so it is not reused.
        """

        _megatron_longctx_cpu = True

        def __init__(self, use_cudagraphable_rng: bool = False, **kwargs: Any) -> None:
            # CUDA-graph-safe generators do not exist on CPU.
            super().__init__(use_cudagraphable_rng=False, **kwargs)

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def _cpu_get_rng_state(
    device: Any = "cuda", clone: bool = False, graph_safe: bool = False
) -> torch.Tensor:
    """CPU version of megatron's _get_cuda_rng_state (same signature)."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    """CPU version of megatron's _set_cuda_rng_state (same signature)."""
    torch.set_rng_state(new_state)


def _patch_rng() -> None:
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    # tensor_parallel/random.py: initialize_rng_tracker() instantiates the module global
    # `CudaRNGStatesTracker` (looked up at call time), whose add() calls
    # torch.cuda.get_rng_state()/manual_seed and whose fork() indexes
    # torch.cuda.default_generators. Rebinding the global makes get_cuda_rng_tracker(),
    # model_parallel_cuda_manual_seed() and every `get_cuda_rng_tracker().fork()` in
    # tensor_parallel/layers.py:142 (GPU-style init), language_model_embedding.py:145 (embedding
    # dropout), transformer_block.py:707 (SP dropout) use CPU generator states.
    mrandom.CudaRNGStatesTracker = _make_cpu_tracker_class()
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    if tracker is not None and not getattr(tracker, "_megatron_longctx_cpu", False):
        mrandom._CUDA_RNG_STATE_TRACKER = None
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    # random.py _get_cuda_rng_state/_set_cuda_rng_state: used by CheckpointFunction
    # (activation recompute replays the forward RNG) and get_all_rng_states/_set_all_rng_states.
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state

    # random.py model_parallel_cuda_manual_seed seeds torch.cuda (a lazy no-op here) but not the
    # CPU generator that CPU initialisation (use_cpu_initialization=True:
    # layers.py _initialize_affine_weight_cpu) draws from. Wrap it to call torch.manual_seed
    # first, as Megatron-LM's _set_random_seed does. Both the defining module and the
    # tensor_parallel package re-export are rebound; `from ... import` copies taken before
    # apply_cpu_patches() keep the original, so apply the patches first thing.
    original = mrandom.model_parallel_cuda_manual_seed
    if getattr(original, "_megatron_longctx_cpu", False):
        return

    @functools.wraps(original)
    def model_parallel_cuda_manual_seed(seed: int, *args: Any, **kwargs: Any) -> None:
        torch.manual_seed(seed)
        original(seed, *args, **kwargs)

    model_parallel_cuda_manual_seed._megatron_longctx_cpu = True  # type: ignore[attr-defined]
    mrandom.model_parallel_cuda_manual_seed = model_parallel_cuda_manual_seed
    tensor_parallel.model_parallel_cuda_manual_seed = model_parallel_cuda_manual_seed


# --------------------------------------------------------------------------------------------
# group "model"
# --------------------------------------------------------------------------------------------
def _cpu_get_pos_emb_on_this_cp_rank(
    pos_emb: torch.Tensor, seq_dim: int, cp_group: torch.distributed.ProcessGroup
) -> torch.Tensor:
    """Megatron's get_pos_emb_on_this_cp_rank without pin_memory/.cuda(): chunks r, 2cp-1-r."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


@functools.lru_cache
def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """transformer/utils.get_default_causal_mask on CPU (True = masked)."""
    return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()


def _patch_model_literals() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding
    from megatron.core.transformer import utils as tutils

    # models/common/embeddings/rope_utils.py:62-64 builds the CP chunk index with
    # pin_memory=True(...).cuda(); RotaryEmbedding.forward (rotary_pos_embedding.py:204/358)
    # calls it whenever CP > 1. Imported by name into rotary_pos_embedding, so patch both.
    rope_utils.get_pos_emb_on_this_cp_rank = _cpu_get_pos_emb_on_this_cp_rank
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _cpu_get_pos_emb_on_this_cp_rank
    # transformer/utils.py:35 get_default_causal_mask uses device="cuda"; reached by megatron's
    # own local DotProductAttention through fused_softmax.py:327 (our SDPA attention never
    # builds an s x s mask, but the stock one stays usable as a reference).
    tutils.get_default_causal_mask = _cpu_default_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_default_causal_mask


# --------------------------------------------------------------------------------------------
# module-local torch stand-in (groups "optimizer", "pipeline", "checkpoint")
# --------------------------------------------------------------------------------------------
def _to_cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return _CPU
    return device


def _cpu_factory(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return factory


class _CpuCudaNamespace:
    """`torch.cuda` as seen by a patched module: no-op synchronisation, CPU device."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def synchronize(*args: Any, **kwargs: Any) -> None:
        """CPU ops are synchronous; megatron syncs around p2p and checkpoint writes."""

    @staticmethod
    def empty_cache() -> None:
        """Nothing to release on CPU."""

    current_device = staticmethod(_cpu_current_device)


class _CpuTorch(types.ModuleType):
    """The `torch` global of one megatron module, with tensor factories mapped to CPU.

    Every attribute not overridden here is the real torch's, so a patched module behaves as
    before except that `torch.zeros(..., device="cuda")`-style literals allocate on CPU and
    `torch.cuda.synchronize()` is a no-op. Only the module's own `torch.X` lookups go through
    the proxy (one Python attribute lookup each); model ops in other modules are untouched.
    """

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like",
                  "empty_like", "ones_like")

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCudaNamespace()
        for name in self._FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _proxy_torch(module: types.ModuleType) -> None:
    if not isinstance(getattr(module, "torch", None), _CpuTorch):
        module.torch = _CpuTorch()  # type: ignore[attr-defined]


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """Make CPU tensors report 'torch.cuda.FloatTensor'-style names from `.type()`.

    megatron's optimizers dispatch on `param.type()` strings and raise TypeError for anything
    else (optimizer.py:671/690 Float16OptimizerWithFloat16Params, distrib_optimizer.py:361/420/582
    param groups, clip_grads.py:167 an assert). Used only around those construction-time calls
    and the clip; `.type(dtype)` conversions pass through unchanged.
    """
    original = torch.Tensor.type

    def cuda_named_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if not args and not kwargs and self.device.type == "cpu" and result.startswith("torch."):
            return "torch.cuda." + result[len("torch."):]
        return result

    torch.Tensor.type = cuda_named_type  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


def _with_cuda_type_names(fn: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(fn, "_megatron_longctx_cpu", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper._megatron_longctx_cpu = True  # type: ignore[attr-defined]
    return wrapper


def _cpu_multi_tensor_l2_norm(
    chunk_size: int, noop_flag: Any, tensor_lists: list, per_tensor: bool, *args: Any
) -> tuple[torch.Tensor, None]:
    """utils.local_multi_tensor_l2_norm without its device="cuda" result (utils.py:1207)."""
    norms = [torch.linalg.vector_norm(t.float()) for tensors in tensor_lists for t in tensors]
    if not norms:
        return torch.zeros(1), None
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


# --------------------------------------------------------------------------------------------
# group "optimizer"
# --------------------------------------------------------------------------------------------
def _patch_optimizer() -> None:
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler, optimizer

    # device="cuda" literals: optimizer.py:473/481/485/907 (found_inf, overflow buffer, scale),
    # grad_scaler.py:15/88/91/94, clip_grads.py:90/103/115/174/207 (norm accumulators),
    # param_and_grad_buffer.py:768; torch.cuda.empty_cache in optimizer.py:362.
    for module in (optimizer, grad_scaler, clip_grads, distrib_optimizer, param_and_grad_buffer):
        _proxy_torch(module)
    # clip_grads.py:42 binds the local l2 norm (utils.py:1207 returns a CUDA tensor) when
    # neither TE nor apex is importable, which is always the case on CPU.
    clip_grads.l2_norm_impl = _cpu_multi_tensor_l2_norm
    # 'torch.cuda.FloatTensor' type dispatch (see _cuda_type_names).
    opt_cls = optimizer.Float16OptimizerWithFloat16Params
    opt_cls.__init__ = _with_cuda_type_names(opt_cls.__init__)
    dist_cls = distrib_optimizer.DistributedOptimizer
    dist_cls.__init__ = _with_cuda_type_names(dist_cls.__init__)
    build = dist_cls.__dict__["_build_model_and_main_param_groups"]
    if isinstance(build, staticmethod):
        dist_cls._build_model_and_main_param_groups = staticmethod(
            _with_cuda_type_names(build.__func__)
        )
    wrapped_clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = wrapped_clip
    optimizer.clip_grad_by_total_norm_fp32 = wrapped_clip


# --------------------------------------------------------------------------------------------
# group "pipeline"
# --------------------------------------------------------------------------------------------
def _patch_pipeline() -> None:
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    # schedules.py:596/983/2138 total_num_tokens = torch.zeros(..., device="cuda") in every
    # schedule; p2p_communication.py:242/398 torch.cuda.synchronize() after batched p2p.
    for module in (schedules, p2p_communication):
        _proxy_torch(module)


# --------------------------------------------------------------------------------------------
# group "checkpoint"
# --------------------------------------------------------------------------------------------
def _patch_checkpoint() -> None:
    from megatron.core.dist_checkpointing.strategies import async_utils, filesystem_async

    # filesystem_async.py:230 torch.cuda.synchronize() before staging tensors for the writer;
    # async_utils.py:212 the same before forking the --async-save writer.
    _proxy_torch(filesystem_async)
    _proxy_torch(async_utils)
    # filesystem_async.py:55 starts a *spawn*-context multiprocessing Manager for the writers'
    # result queue (spawn keeps a CUDA context out of the child): it re-imports torch, ~4 s on
    # the first save of every process, and the server outlives a rank that exits with
    # os._exit. (A fork-context Manager is not an option: forking a server from a process that
    # runs gloo threads can deadlock it at start-up.) A plain fork-context queue (a pipe, no
    # server process) serves both save modes: synchronous saves fill it from a thread of the
    # calling process, --async-save from the writer process that dist_checkpointing's
    # TemporalAsyncCaller forks, which inherits the queue. The reader
    # (`retrieve_write_results`, run after the writer has finished) uses get_nowait, which can
    # miss an item the queue's feeder thread has not yet flushed into the pipe; the wrapper
    # waits for it instead.
    original = filesystem_async._get_write_results_queue
    if getattr(original, "_megatron_longctx_cpu", False):
        return

    def _get_write_results_queue() -> Any:
        # One queue per process: a rank forked from a process that saved before (spawned
        # test ranks, any forking launcher) inherits the module global, and ranks sharing one
        # pipe read each other's results ("Incomplete worker results (expected 2, got 1)").
        current = filesystem_async._results_queue
        if current is None or getattr(current, "pid", None) != os.getpid():
            filesystem_async._results_queue = _WriterResults()
        return filesystem_async._results_queue

    _get_write_results_queue._megatron_longctx_cpu = True  # type: ignore[attr-defined]
    filesystem_async._get_write_results_queue = _get_write_results_queue


class _WriterResults:
    """The writers' result queue on CPU: a fork-context multiprocessing queue whose
    `get_nowait` waits up to 60 s (it is only called once the writer has finished)."""

    def __init__(self) -> None:
        import multiprocessing

        self.pid = os.getpid()  # the process whose saves read it (see the getter)
        self._queue = multiprocessing.get_context("fork").Queue()

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def get_nowait(self) -> Any:
        return self._queue.get(timeout=60.0)


PATCH_GROUPS: dict[str, tuple[Callable[[], None], ...]] = {
    "device": (_patch_current_device,),
    "rng": (_patch_rng,),
    "model": (_patch_model_literals,),
    "optimizer": (_patch_optimizer,),
    "pipeline": (_patch_pipeline,),
    "checkpoint": (_patch_checkpoint,),
}


def cpu_patches_needed() -> bool:
    """True when CUDA is unavailable (the only case the patches are applied in)."""
    return not torch.cuda.is_available()


def apply_cpu_patches(groups: tuple[str, ...] | None = None, force: bool = False) -> list[str]:
    """Apply the CPU patches (all groups by default); a no-op with CUDA unless `force`.

    Idempotent: a group applied once is skipped afterwards.

    Returns:
        Names of the groups applied so far in this process.
    """
    if not force and not cpu_patches_needed():
        return sorted(_APPLIED)
    for name in groups or tuple(PATCH_GROUPS):
        if name not in PATCH_GROUPS:
            raise ValueError(f"unknown CPU patch group {name!r}; choose from {list(PATCH_GROUPS)}")
        if name in _APPLIED:
            continue
        for patch in PATCH_GROUPS[name]:
            patch()
        _APPLIED.add(name)
    return sorted(_APPLIED)

