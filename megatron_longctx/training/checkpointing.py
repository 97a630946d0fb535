"""Training checkpoints on megatron-core dist_checkpointing (layout: docs/checkpoint-format.md).

Save: every rank contributes its shards of {model(s), optimizer, scheduler, RNG, data
position} to `ROOT/iter_NNNNNNN/`; rank 0 then writes `longctx_meta.json` and, last, the
`latest_checkpointed_iteration.txt` marker, after a barrier. A save killed midway leaves the
marker on the previous complete checkpoint, so a requeued job never loads a torn one.

Load: the same sharded dict built on the loading layout; dist_checkpointing maps the global
ShardedTensor keys onto whatever TP/PP/CP/DP the loader has (the distributed optimizer is saved
`fully_reshardable` for that reason: the default sharded format refuses flattened ranges).
Model-only checkpoints (converted from HF, `has_optimizer: false`) and `--finetune` load just
the weights and start at iteration 0 with a fresh optimizer.

Two fixes megatron-core 0.16.1 needs (both silent wrong results without them):
* torch AdamW under the distributed optimizer without TE/apex: load_state_dict gives every
  parameter the *same* `step` tensor, which AdamW increments in place once per parameter, so
  bias correction drifts after a resume (loss off by ~7.5e-4 after a few steps). We de-alias
  the tensors after loading (`_unshare_adam_steps`).
* Restored RNG includes the CPU generator (megatron's tracker restores only CUDA states).

Asynchronous saves (`--async-save`, megatron-core's `AsyncCallsQueue` with the torch_dist
writer, as Megatron-LM): every rank builds its sharded state dict, plans the write and writes
`common.pt` and the sharded objects (RNG) synchronously, then hands the tensors to a writer
process forked at that moment and returns to training. The fork is the snapshot: the child sees
the parameters and optimizer state as they were when it was forked (copy-on-write pages), so
the steps that run during the write cannot leak into the checkpoint, on CPU as on GPU (there the
tensors are first copied to host memory by megatron's preload). Measured on CPU
(tests/distributed/test_async_save.py): weights changed in place right after the save is
scheduled do not reach the checkpoint. (What does not snapshot CPU tensors is megatron's
*persistent* worker, which receives tensors through a queue as shared memory; it is not used.)
Cost: the pages training modifies during the write are copied once (at most one more copy of
the rank's checkpoint shard in host memory, the same as GPU staging). The marker moves only
in the finalisation that runs once all ranks' writers are done (`finalize_async_saves`, polled
every step and forced before the next save and at exit): a run killed during an async write
resumes from the previous checkpoint.

Retention (`--keep-last-checkpoints N`, `--keep-checkpoints-every K`): after a save is complete
and marked latest, rank 0 deletes older iteration directories beyond the newest N complete ones,
keeping multiples of K. A directory is first renamed to `.trash-iter_*` (atomic), then removed:
a kill during deletion leaves the marker and the kept checkpoints intact and at most a trash
directory, removed by the next save. Directories newer than the marker (a save in progress) are
never touched.

First save in a process ~4 s on CPU (a helper process is started), later ones ~0.5 s.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_longctx.checkpoint import meta as checkpoint_meta
from megatron_longctx.checkpoint.integrity import check_checkpoint_files, guarded_read
from megatron_longctx.checkpoint.model_io import (
    checkpoint_tensor_info,
    load_model_checkpoint,
    model_sharded_state_dict,
    model_state_keys,
)
from megatron_longctx.config.tokenizer import NULL_TOKENIZER
from megatron_longctx.config.training import PretrainConfig
from megatron_longctx.model.build import unwrap_model

log = logging.getLogger(__name__)

_DISTOPT_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
}


@dataclass
class TrainState:
    """Loop counters saved with the checkpoint (restored on resume)."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0


def _layout() -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    return {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "context_parallel_size": ps.get_context_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": vpp,
        "world_size": dist.get_world_size(),
    }


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object() -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)


def _sharded_state(model_chunks: list[Any], optimizer: Any | None, scheduler: Any | None,
                   state: TrainState | None, *, is_loading: bool, with_rng: bool) -> dict:
    sharded = model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            dict(sharded), is_loading=is_loading, metadata=_DISTOPT_METADATA)
    if scheduler is not None:
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    if state is not None:
        sharded["train_state"] = asdict(state)
    if with_rng:
        sharded["rng_state"] = _rng_sharded_object()
    return sharded


class CheckpointMismatchError(ValueError):
    """The checkpoint cannot be loaded into the model this run builds; the message is one line
    naming the checkpoint, both values and the flag to change (the entrypoint exits 2)."""


#: Name of the embedding in the checkpoint's tensor metadata (its rows are the padded vocab).
EMBEDDING_KEY = "embedding.word_embeddings.weight"


def _tokenizer_flag(cfg: PretrainConfig) -> str:
    if cfg.data.tokenizer_type == NULL_TOKENIZER:
        return "--vocab-size"
    if cfg.data.mixture_plan and not cfg.data.tokenizer_model:
        return "--tokenizer-model (the plan's tokenizer is used without it)"
    return "--tokenizer-model"


def check_vocabulary(directory: Path, meta: dict[str, Any], cfg: PretrainConfig, *,
                     weights_only: bool) -> None:
    """Refuse, before any tensor is read, a checkpoint whose vocabulary this run cannot load.

    Compared: the tokenizer vocabulary recorded in longctx_meta.json (`model.vocab_size` when
    `pad_vocab`) with this run's, and the embedding rows in the checkpoint's tensor metadata
    (the padded vocabulary it was saved with) with the rows this run builds
    (`ModelConfig.padded_vocab`: --make-vocab-size-divisible-by x TP, or --padded-vocab-size).

    * Different tokenizer vocabularies: always refused (token ids would address other rows).
    * Same tokenizer, different padding (a TP change: LLaMA-3's 128256 rows at TP1 vs 129024
      at TP8): weights-only loads (model-only checkpoint, --finetune, --no-load-optim) absorb it,
      padding rows are never targets (checkpoint/model_io.py); a full resume is refused, since
      the optimizer state of the embedding has the saved shape.

    Raises:
        CheckpointMismatchError: naming `directory`, both sizes and the flag to change.
    """
    saved_model = meta.get("model") or {}
    tp = cfg.parallel.tensor_model_parallel_size
    rows = cfg.model.padded_vocab(tp)
    info = checkpoint_tensor_info(directory)
    saved_rows = info[EMBEDDING_KEY][0][0] if EMBEDDING_KEY in info else \
        saved_model.get("vocab_size")
    saved_vocab = saved_model.get("vocab_size") if saved_model.get("pad_vocab") else None
    vocab = cfg.model.vocab_size if cfg.model.pad_vocab else None
    if saved_vocab is not None and vocab is not None and saved_vocab != vocab:
        raise CheckpointMismatchError(
            f"--load {directory}: checkpoint vocabulary {saved_vocab} (padded {saved_rows}), "
            f"this run's tokenizer {vocab} (padded {rows}); change {_tokenizer_flag(cfg)} to "
            "the checkpoint's tokenizer")
    if saved_rows is not None and saved_rows != rows and not weights_only:
        raise CheckpointMismatchError(
            f"--load {directory}: checkpoint padded vocabulary {saved_rows}, this run's {rows} "
            f"(tokenizer {cfg.model.vocab_size}, TP {tp}); change "
            "--make-vocab-size-divisible-by (or --padded-vocab-size) so they agree, or pass "
            "--no-load-optim to load the weights only")


#: longctx_meta.json keys carried from a loaded checkpoint into the ones this run saves
#: (hf_config: the converted model's original config.json, so megatron-to-hf keeps token ids).
CARRIED_META_KEYS = ("hf_config", "converted_from")


def save_checkpoint(root: str, state: TrainState, model_chunks: list[Any], optimizer: Any,
                    scheduler: Any, cfg: PretrainConfig,
                    extra_meta: dict[str, Any] | None = None, *,
                    async_queue: Any | None = None) -> Path:
    """Save everything needed to resume at `state.iteration`; returns the iteration dir.

    With `async_queue` (a megatron-core `AsyncCallsQueue`, from `make_async_queue`) the tensors
    are written by a background process and the metadata, the latest marker and retention
    follow in the queue's finalisation; a save still in flight is finalised first (one at a
    time). Without it everything is done when this returns. Collective: every rank calls it.
    """
    from megatron.core import dist_checkpointing

    start = time.time()
    if async_queue is not None:
        finalize_async_saves(async_queue, blocking=True)
    directory = checkpoint_meta.iter_dir(root, state.iteration)
    if dist.get_rank() == 0:
        if directory.exists():  # a torn save of the same iteration from a killed run
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
    dist.barrier()
    sharded = _sharded_state(model_chunks, optimizer, scheduler, state, is_loading=False,
                             with_rng=True)
    meta = {
        "iteration": state.iteration,
        "model": asdict(cfg.model),
        "has_optimizer": True,
        "use_distributed_optimizer": cfg.optim.use_distributed_optimizer,
        "saved_with": _layout(),
        "tokenizer": {"type": cfg.data.tokenizer_type, "model": cfg.data.tokenizer_model},
        "source": "pretrain_longctx.py",
        **(extra_meta or {}),
    }
    ck, iteration = cfg.checkpoint, state.iteration  # `state` moves on during an async write

    def finish() -> None:
        # Runs after every rank's tensors are on disk (dist_checkpointing's own finalisation,
        # which writes .metadata and ends in a barrier, comes first).
        if dist.get_rank() == 0:
            checkpoint_meta.write_meta(directory, meta)
            checkpoint_meta.write_latest(root, iteration)
            if ck.keep_last_checkpoints:
                apply_retention(root, ck.keep_last_checkpoints, ck.keep_checkpoints_every)
        dist.barrier()
        log.info("checkpoint %s complete %.2f s after the save started", directory,
                 time.time() - start)

    request = dist_checkpointing.save(sharded, str(directory), validate_access_integrity=True,
                                      async_sharded_save=async_queue is not None)
    if request is None:
        dist.barrier()
        finish()
    else:
        request.add_finalize_fn(finish)
        async_queue.schedule_async_request(request)
        log.info("async save of %s scheduled in %.2f s", directory, time.time() - start)
    return directory


def make_async_queue() -> Any:
    """megatron-core's queue of asynchronous saves, with a writer process forked per save
    (`persistent=False`, Megatron-LM's default): the fork snapshots the state (module
    docstring)."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    return AsyncCallsQueue(persistent=False)


def finalize_async_saves(async_queue: Any | None, *, blocking: bool) -> list[int]:
    """Finish the saves whose writers are done on every rank (all of them, waiting, with
    `blocking`): .metadata, longctx_meta.json, the latest marker, retention. Collective (one
    small all-reduce) while a save is in flight; free otherwise."""
    if async_queue is None or not async_queue.get_num_unfinalized_calls():
        return []
    return async_queue.maybe_finalize_async_calls(blocking=blocking)


#: Prefix of an iteration directory being deleted by retention (never loaded).
TRASH_PREFIX = ".trash-"


def apply_retention(root: str | os.PathLike, keep_last: int,
                    keep_every: int | None = None) -> list[int]:
    """Delete old checkpoints under `root`, keeping the newest `keep_last` complete ones (the
    latest among them) and every iteration divisible by `keep_every`; returns the iterations
    deleted. Only directories older than the latest marker are candidates, and the latest is
    always kept, so at every moment at least one complete checkpoint exists. Each directory is
    renamed to `.trash-iter_*` before it is removed (a kill mid-removal leaves no half
    checkpoint under an iter_ name); leftovers of an earlier kill are removed first.
    """
    root = Path(root)
    for trash in root.glob(TRASH_PREFIX + "iter_*"):
        shutil.rmtree(trash, ignore_errors=True)
    latest = checkpoint_meta.latest_iteration(root)
    if latest is None:
        return []
    iterations = sorted(
        int(p.name[len("iter_"):]) for p in root.glob("iter_*")
        if p.is_dir() and p.name[len("iter_"):].isdigit())
    older = [it for it in iterations if it <= latest]
    complete = [it for it in older
                if (checkpoint_meta.iter_dir(root, it) / checkpoint_meta.META_NAME).is_file()]
    keep = set(complete[-keep_last:]) | {latest}
    if keep_every:
        keep |= {it for it in complete if it % keep_every == 0}
    deleted = []
    for it in older:
        if it in keep:
            continue
        directory = checkpoint_meta.iter_dir(root, it)
        trash = root / (TRASH_PREFIX + directory.name)
        os.replace(directory, trash)
        shutil.rmtree(trash)
        deleted.append(it)
    if deleted:
        log.info("retention: deleted iterations %s under %s", deleted, root)
    return deleted


def _unshare_adam_steps(optimizer: Any) -> None:
    """Give each parameter its own AdamW `step` tensor (see module docstring)."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", None)
        if torch_opt is None:
            continue
        for param_state in torch_opt.state.values():
            step = param_state.get("step")
            if isinstance(step, torch.Tensor):
                param_state["step"] = step.detach().clone()


def _fix_distopt_step_copy() -> None:
    """Let the distributed optimizer load into torch AdamW state that has a `step` entry.

    0.16.1's load_state_dict first gives every parameter state a (shared) `step` from the
    checkpoint, then `_set_main_param_and_optimizer_states` copies the per-parameter tensors
    for every key of the *destination* state, `step` included, from a source that has no
    `step` (it is restored separately): KeyError 'step' on every resume with torch AdamW
    (no TE/apex: CPU, and GPUs without them). Skipping the key keeps the value set before.
    Idempotent; harmless with TE/apex (their Adam state has no `step`).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_megatron_longctx_fix", False):
        return

    def set_states(self: Any, model_param: Any, tensors: dict) -> None:
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        step = state.pop("step", None)
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    set_states._megatron_longctx_fix = True  # type: ignore[attr-defined]
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _ensure_optimizer_state(optimizer: Any) -> None:
    """Materialise Adam state on a fresh optimizer so its sharded dict can be built for loading.

    0.16.1 reads a common `step` from the state while building the (fully reshardable)
    distributed-optimizer state dict and finds none before the first step (assert / KeyError
    'step' in a fresh process). One step with zero gradients at lr = 0 and weight decay 0
    creates exp_avg / exp_avg_sq / step without changing any parameter (AdamW's update and
    decay are both multiplied by lr); the loaded values then overwrite them.
    """
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", None)
        if torch_opt is None or any(len(s) for s in torch_opt.state.values()):
            continue
        saved = [(g["lr"], g.get("weight_decay", 0.0)) for g in torch_opt.param_groups]
        params = [p for g in torch_opt.param_groups for p in g["params"]]
        for group in torch_opt.param_groups:
            group["lr"], group["weight_decay"] = 0.0, 0.0
        for param in params:
            param.grad = torch.zeros_like(param)
        torch_opt.step()
        for param in params:
            param.grad = None
        for group, (lr, wd) in zip(torch_opt.param_groups, saved):
            group["lr"], group["weight_decay"] = lr, wd


def check_checkpoint_to_load(load: str | None) -> None:
    """Check the checkpoint `--load` names (marker, metadata, tensor files) without torch
    collectives: the entrypoint calls it before any process group exists, so a damaged
    checkpoint fails in a second instead of after the model and datasets are built.

    Raises:
        CheckpointError: naming the damaged file.
    """
    if not load:
        return
    directory = checkpoint_meta.resolve_checkpoint(load)
    if directory is not None:
        checkpoint_meta.read_meta(directory)
        check_checkpoint_files(directory)


def load_checkpoint(load: str, model_chunks: list[Any], optimizer: Any, scheduler: Any,
                    cfg: PretrainConfig) -> tuple[TrainState, dict[str, Any]] | None:
    """Restore from `load` (a root or an iter_ dir). Returns None when there is nothing yet.

    Full resume unless the checkpoint has no optimizer state or --finetune is given, which
    load only the model weights and return a TrainState at iteration 0.

    Returns:
        (state, meta keys to carry into later saves), or None.

    Raises:
        CheckpointError: a damaged marker, metadata or tensor file, named (every rank checks
            the same files before any collective read, so all ranks fail alike).
        CheckpointMismatchError: the checkpoint does not fit this run.
    """
    from megatron.core import dist_checkpointing

    directory = checkpoint_meta.resolve_checkpoint(load)
    if directory is None:
        return None
    meta = checkpoint_meta.read_meta(directory)
    check_checkpoint_files(directory)
    ck = cfg.checkpoint
    full = meta.get("has_optimizer", False) and not ck.finetune
    check_vocabulary(directory, meta, cfg, weights_only=not full or ck.no_load_optim)
    same_layout = meta.get("saved_with") == _layout()
    carried = {k: meta[k] for k in CARRIED_META_KEYS if k in meta}
    start = time.time()
    if not full:
        load_model_checkpoint(model_chunks, directory)
        _refresh_main_params(optimizer)
        log.info("loaded model weights from %s (iteration 0 from here)", directory)
        return TrainState(), carried
    load_optim = not ck.no_load_optim
    saved_distopt = meta.get("use_distributed_optimizer")
    if load_optim and saved_distopt is not None and \
            saved_distopt != cfg.optim.use_distributed_optimizer:
        raise ValueError(
            f"{directory}: optimizer state was saved "
            f"{'with' if saved_distopt else 'without'} --use-distributed-optimizer; resume "
            "with the same setting (TP/PP/CP/DP may change), or pass --no-load-optim"
        )
    load_rng = not ck.no_load_rng and same_layout
    if load_optim:
        _fix_distopt_step_copy()
        _ensure_optimizer_state(optimizer)
    sharded = _sharded_state(model_chunks, optimizer if load_optim else None,
                             scheduler, TrainState(), is_loading=True, with_rng=load_rng)
    with guarded_read(directory):
        loaded = dist_checkpointing.load(sharded, str(directory))
    _load_model_state(model_chunks, loaded)
    if load_optim:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    else:
        _refresh_main_params(optimizer)
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    elif not ck.no_load_rng:
        log.info("checkpoint layout %s differs from this run's; RNG state not restored",
                 meta.get("saved_with"))
    state = TrainState(**loaded["train_state"])
    log.info("resumed from %s at iteration %d in %.2f s", directory, state.iteration,
             time.time() - start)
    return state, carried


def _refresh_main_params(optimizer: Any) -> None:
    """Copy freshly loaded model weights into the optimizer's fp32 main parameters.

    With --bf16/--fp16 the optimizer keeps fp32 main copies of the parameters (the Float16
    optimizer's `fp32_from_float16_groups`, the distributed optimizer's main shards), taken
    when it is built, i.e. from the random initialisation. A load that does not restore the
    optimizer (model-only checkpoint, --finetune, --no-load-optim) changes only the model
    parameters; without this refresh the first step computes `main - lr * update` from the
    random copies and writes them back, discarding the loaded weights (a converted HF model
    moved by 0.13 after one bf16 step at lr 1e-9). Megatron-LM calls the same
    `reload_model_params()` in that case. In fp32 the optimizer steps the model parameters
    themselves (or views of them), so this is a no-op there.
    """
    if optimizer is not None:
        optimizer.reload_model_params()


def _load_model_state(model_chunks: list[Any], loaded: dict) -> None:
    for key, chunk in zip(model_state_keys(len(model_chunks)), model_chunks):
        unwrap_model(chunk).load_state_dict(loaded[key], strict=True)

