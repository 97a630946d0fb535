"""Model-only checkpoint I/O in our format (docs/checkpoint-format.md), at any TP/PP.

`save_model_checkpoint` writes `{"model": chunk.sharded_state_dict()}` (or `model0`, `model1`,
... with virtual pipeline stages) through `megatron.core.dist_checkpointing.save`, then
`longctx_meta.json` with `has_optimizer: false`, then the `latest_checkpointed_iteration.txt`
marker, so a crash mid-save never leaves a marker pointing at an incomplete directory.

`load_model_checkpoint` loads only the model part of any checkpoint of ours (converted or saved
by the trainer, with or without optimizer state) into model chunks built for any TP/PP/VPP:
ShardedTensor keys are global, so dist_checkpointing reshards. Two differences between saver
and loader are absorbed here instead of failing:

* Vocabulary padding: Megatron pads the vocabulary to a multiple of 128 * TP, so the embedding
  and output layer of a TP1 save (LLaMA-3: 128256 rows) differ from a TP8 model's (129024 rows).
  megatron-core marks both tensors `allow_shape_mismatch`: the overlapping rows are loaded and
  the rest zeroed. Rows past the true vocabulary are padding either way (tokens never index
  them; their logits are what Megatron-LM gives padded entries).
* `_extra_state` objects the checkpoint lacks (a local-spec save loaded into a Transformer
  Engine model or the reverse) are skipped: the model keeps its fresh FP8 metadata.

`single_process_group` gives tools (the converter, evaluation) a 1-rank gloo group with
megatron's parallel state at TP1/PP1 when none exists, with the CPU patches applied first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_longctx.checkpoint.integrity import guarded_read, open_checkpoint
from megatron_longctx.checkpoint.meta import (
    META_NAME,
    iter_dir,
    model_config_of,
    write_latest,
    write_meta,
)
from megatron_longctx.config.dtypes import dtype_name
from megatron_longctx.config.model import ModelConfig, ParallelConfig
from megatron_longctx.model.build import unwrap_model
from megatron_longctx.parallel.init import release_model_parallel

_LAYER_RE = re.compile(r"decoder\.layers\.(\d+)\.(.*)")
# ModelConfig fields a checkpoint and a model must agree on (anything else, e.g. RoPE base or
# sequence length, may legitimately change when continuing training from a checkpoint).
_ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "query_groups", "head_dim", "add_qkv_bias")


def model_state_keys(num_chunks: int) -> list[str]:
    """Top-level checkpoint keys of the model: `model`, or `model0`, `model1`, ... with
    virtual pipeline stages (Megatron-LM's names)."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_sharded_state_dict(model_chunks: Sequence[Any]) -> dict[str, Any]:
    """`{"model": ...}` for one chunk, `{"model0": ..., "model1": ...}` for virtual stages;
    the unwrapped GPTModel's keys (no DDP / Float16Module `module.` prefixes)."""
    return {key: unwrap_model(chunk).sharded_state_dict()
            for key, chunk in zip(model_state_keys(len(model_chunks)), model_chunks)}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model_checkpoint(
    model_chunks: Sequence[Any],
    root: str | Path,
    iteration: int,
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    source: str,
    tokenizer: dict[str, Any] | None = None,
    *,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Save model weights only (no optimizer) as ROOT/iter_NNNNNNN; collective on all ranks.

    Args:
        model_chunks: this rank's model chunks (one per virtual pipeline stage).
        root: checkpoint root; created if needed.
        iteration: iteration number of the directory and the latest marker.
        model_cfg: architecture, stored as `model` in longctx_meta.json.
        parallel_cfg: layout the chunks were built with (`saved_with`).
        source: who wrote it, e.g. "convert_checkpoint.py hf-to-megatron".
        tokenizer: `{"type": ..., "model": ...}` or None.
        extra_meta: more top-level keys for longctx_meta.json (e.g. `hf_config`).

    Returns:
        The iteration directory.

    Raises:
        FileExistsError: the iteration directory already holds a complete checkpoint.
    """
    from megatron.core import dist_checkpointing

    directory = iter_dir(root, iteration)
    if (directory / META_NAME).exists():
        raise FileExistsError(f"{directory} already holds a complete checkpoint")
    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save(model_sharded_state_dict(model_chunks), str(directory))
    if _rank() == 0:
        vpp = parallel_cfg.virtual_pipeline_model_parallel_size
        meta = {
            "iteration": iteration,
            "model": dataclasses.asdict(model_cfg),
            "has_optimizer": False,
            "saved_with": {
                "tensor_model_parallel_size": parallel_cfg.tensor_model_parallel_size,
                "pipeline_model_parallel_size": parallel_cfg.pipeline_model_parallel_size,
                "context_parallel_size": parallel_cfg.context_parallel_size,
                "virtual_pipeline_model_parallel_size": vpp,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            },
            "tokenizer": tokenizer,
            "source": source,
            "params_dtype": dtype_name(_first_param_dtype(model_chunks)),
            **(extra_meta or {}),
        }
        write_meta(directory, meta)
    _barrier()
    if _rank() == 0:
        write_latest(root, iteration)
    _barrier()
    return directory


def _first_param_dtype(model_chunks: Sequence[Any]) -> torch.dtype | None:
    for chunk in model_chunks:
        for param in chunk.parameters():
            return param.dtype
    return None


def checkpoint_tensor_info(ckpt_dir: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor in a checkpoint directory, without loading data.

    Keys are the global ShardedTensor keys (layers stacked on a leading axis).

    Raises:
        CheckpointError: the tensor index cannot be read (named).
    """
    from megatron.core import dist_checkpointing

    with guarded_read(ckpt_dir, "tensor metadata cannot be read"):
        meta = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    return {key: (tuple(t.global_shape), t.dtype) for key, t in meta.items()}


def checkpoint_params_dtype(ckpt_dir: str | Path) -> str:
    """fp32 | bf16 | fp16: the dtype the model weights were saved in (from the embedding)."""
    info = checkpoint_tensor_info(ckpt_dir)
    for key in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight"):
        if key in info:
            return dtype_name(info[key][1])
    raise ValueError(f"{ckpt_dir}: no model weights found (embedding.word_embeddings.weight)")


def _check_architecture(meta: dict[str, Any], model_chunks: Sequence[Any], where: Path) -> None:
    saved = model_config_of(meta, where)
    model = unwrap_model(model_chunks[0])
    config = model.config
    have = {"num_layers": config.num_layers, "hidden_size": config.hidden_size,
            "ffn_hidden_size": config.ffn_hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "query_groups": config.num_query_groups or config.num_attention_heads,
            "head_dim": config.kv_channels, "add_qkv_bias": config.add_qkv_bias}
    diffs = [f"{name}: checkpoint {getattr(saved, name)}, model {have[name]}"
             for name in _ARCH_FIELDS if getattr(saved, name) != have[name]]
    vocab = getattr(model, "vocab_size", None)
    if vocab is not None and vocab < saved.vocab_size:
        diffs.append(f"vocab_size: checkpoint {saved.vocab_size}, model {vocab}")
    if diffs:
        raise ValueError(f"{where}: checkpoint architecture differs from the model: "
                         + "; ".join(diffs))


def _iter_sharded(tree: Any) -> Iterator[tuple[dict, Any, Any]]:
    """(parent dict, key, value) for every leaf of a nested sharded state dict."""
    for key, value in list(tree.items()):
        if isinstance(value, dict):
            yield from _iter_sharded(value)
        else:
            yield tree, key, value


def _prepare_request(sharded: dict[str, Any], directory: Path) -> None:
    """Fail early, naming keys, for tensors the checkpoint lacks; drop absent _extra_state."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    with guarded_read(directory, "tensor metadata cannot be read"):
        available = load_sharded_metadata(str(directory))
    object_keys = {key.split("/shard_")[0] for key in available}
    missing = []
    for parent, key, value in _iter_sharded(sharded):
        if isinstance(value, ShardedObject):
            if value.key not in object_keys:
                if value.key.endswith("_extra_state"):
                    del parent[key]
                else:
                    missing.append(value.key)
        elif (isinstance(value, (ShardedTensor, ShardedTensorFactory))
              and value.key not in available):
            missing.append(value.key)
    if missing:
        raise KeyError(f"{directory}: checkpoint lacks {len(missing)} model tensors the model "
                       f"needs, e.g. {sorted(set(missing))[:5]}")


def load_model_checkpoint(model_chunks: Sequence[Any], ckpt_path: str | Path) -> dict[str, Any]:
    """Load model weights (never optimizer state) from one of our checkpoints; collective.

    Works for any TP/PP/VPP of `model_chunks` (dist_checkpointing reshards) and any saved
    layout, converted or trained, and casts to the model's dtype (a bf16 checkpoint loads into
    fp32 parameters exactly). Call on every rank after building the chunks; chunks may be
    wrapped (DDP, Float16Module).

    Args:
        model_chunks: this rank's model chunks.
        ckpt_path: a checkpoint root (its latest marker is followed) or an iteration directory.

    Returns:
        The checkpoint's longctx_meta.json (iteration, model config, has_optimizer, ...).

    Raises:
        CheckpointNotFoundError: no complete checkpoint at `ckpt_path` (a FileNotFoundError).
        CheckpointError: a damaged marker, metadata or tensor file (checkpoint/integrity.py).
        ValueError: the checkpoint's architecture differs from the model's.
        KeyError: the checkpoint lacks tensors the model needs.
    """
    from megatron.core import dist_checkpointing

    directory, meta = open_checkpoint(ckpt_path)
    _check_architecture(meta, model_chunks, directory)
    request = model_sharded_state_dict(model_chunks)
    _prepare_request(request, directory)
    with guarded_read(directory):
        state = dist_checkpointing.load(request, str(directory))
    for name, chunk in zip(model_state_keys(len(model_chunks)), model_chunks):
        result = unwrap_model(chunk).load_state_dict(state[name], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise KeyError(f"{directory}: state dict mismatch for {name}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return meta


def canonical_parameters(model: Any) -> dict[str, torch.Tensor]:
    """This rank's model tensors under their checkpoint names, one entry per layer.

    Names are those of docs/checkpoint-format.md with the global layer number spliced in
    (`decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight` for the local spec's
    `input_layernorm.weight`, through the layer's `sharded_state_dict_keys_map`), so the same
    names address a local-spec and a Transformer Engine model. Values are the parameters
    themselves (TP-local shards): writing into them under `torch.no_grad()` sets the model.
    Tied output layers have no entry of their own.
    """
    model = unwrap_model(model)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state") or not isinstance(tensor, torch.Tensor):
            continue
        match = _LAYER_RE.fullmatch(name)
        if match:
            layer = model.decoder.layers[int(match.group(1))]
            rest = match.group(2)
            keys_map = getattr(layer.submodules_config, "sharded_state_dict_keys_map", None)
            for old, new in (keys_map or {}).items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            name = f"decoder.layers.{layer.layer_number - 1}.{rest}"
        out[name] = tensor
    return out


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """Megatron parallel state at TP1/PP1 for a tool that runs in one process.

    Applies the CPU patches, creates a 1-rank gloo group (file rendezvous: no port) when no
    process group exists, and (re)initialises megatron's model-parallel groups at TP1/PP1.
    On exit the model-parallel groups are destroyed, and the process group too if it was
    created here.

    Raises:
        RuntimeError: a process group with more than one rank already exists.
    """
    from megatron_longctx.parallel.cpu_compat import apply_cpu_patches
    from megatron_longctx.parallel.init import initialize_model_parallel, set_seed

    apply_cpu_patches()
    created, rendezvous = False, None
    if not dist.is_initialized():
        rendezvous = tempfile.mkdtemp(prefix="longctx-pg-")
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}/store", rank=0,
                                world_size=1)
        created = True
    elif dist.get_world_size() != 1:
        raise RuntimeError(f"single_process_group needs a 1-rank world, this one has "
                           f"{dist.get_world_size()} ranks")
    try:
        initialize_model_parallel(ParallelConfig())
        set_seed(1234)
        yield
    finally:
        release_model_parallel()
        if created:
            dist.destroy_process_group()
            shutil.rmtree(rendezvous, ignore_errors=True)
