"""Make megatron-core 0.16.1 run on CPU with gloo: targeted, idempotent patches.

megatron-core assumes CUDA at about 30 call sites (device="cuda" literals,
`torch.cuda.current_device()`, `.cuda()`, the CUDA RNG tracker). Two ways to run it on CPU:

* a torch function mode that maps device "cuda" to CPU: catches everything, but costs ~2 us per
  op on every op of every step;
* targeted patches of the call sites a run actually reaches (this module): zero per-op cost,
  and each patch is listed here with the 0.16.1 call site it exists for.

`apply_cpu_patches()` does nothing when CUDA is available (GPU runs use megatron unchanged) and
is idempotent. Patches are grouped; `PATCH_GROUPS` maps a group name to its appliers so later
groups (optimizer, pipeline schedules, dist checkpointing) are one function plus one entry away.

Groups applied today, enough for GPTModel forward/backward with TP, CP and SP and activation
recompute:

* "device": `torch.cuda.current_device` -> CPU device.
* "rng": a CPU RNG tracker for `model_parallel_cuda_manual_seed` / `get_cuda_rng_tracker`, and a
  seed wrapper that also seeds the CPU generator (megatron seeds only the CUDA one, so CPU
  initialisation was otherwise unseeded: a silent source of run-to-run differences).
* "model": CUDA literals in the model path (RoPE CP slicing, default causal mask).
"""

from __future__ import annotations

import contextlib
import functools
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


# Later groups go here, e.g. "optimizer" (optimizer.py / clip_grads.py device="cuda" and
# 'torch.cuda.FloatTensor' type checks, distrib_optimizer.py .cuda()), "pipeline"
# (schedules.py device="cuda", p2p_communication.py torch.cuda.synchronize), "checkpoint"
# (filesystem_async.py torch.cuda.synchronize).
PATCH_GROUPS: dict[str, tuple[Callable[[], None], ...]] = {
    "device": (_patch_current_device,),
    "rng": (_patch_rng,),
    "model": (_patch_model_literals,),
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


def applied_patch_groups() -> list[str]:
    """Groups applied so far in this process."""
    return sorted(_APPLIED)
