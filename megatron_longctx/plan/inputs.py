"""What the planner estimates: a model shape from a preset, an HF config or a checkpoint, and
a `Layout` from the trainer's own resolved config (`pretrain_longctx.py --dry-run`).

The readers are the project's own: `config.presets`, `convert.hf_llama.read_hf_config` /
`model_config_from_hf`, `checkpoint.meta.read_meta` / `model_config_of`, so the planner sees the
model exactly as conversion and training do.
"""

from __future__ import annotations

import os
from dataclasses import replace

from megatron_longctx.config.model import ModelConfig
from megatron_longctx.config.training import PretrainConfig
from megatron_longctx.plan.memory import Layout


def load_model(*, preset: str | None = None, hf_dir: str | None = None,
               checkpoint: str | None = None) -> ModelConfig:
    """The model of exactly one source; ValueError / FileNotFoundError name the input."""
    given = [x for x in (preset, hf_dir, checkpoint) if x]
    if len(given) != 1:
        raise ValueError("give exactly one of --model-preset, --hf-config, --load")
    if preset:
        from megatron_longctx.config.presets import get_preset

        model = get_preset(preset)
        return replace(model, pad_vocab=True)
    if hf_dir:
        from megatron_longctx.convert.hf_llama import model_config_from_hf, read_hf_config

        model = model_config_from_hf(read_hf_config(hf_dir),
                                     os.path.join(hf_dir, "config.json"))
        return replace(model, pad_vocab=True)
    from megatron_longctx.checkpoint.meta import model_config_of, read_meta, resolve_checkpoint

    directory = resolve_checkpoint(checkpoint)
    if directory is None:
        raise FileNotFoundError(f"--load {checkpoint}: no checkpoint found")
    return model_config_of(read_meta(directory), directory)


def layout_from_config(cfg: PretrainConfig, world_size: int, *, cuda: bool = True,
                       transformer_impl: str | None = None) -> Layout:
    """The Layout a resolved PretrainConfig runs with on `world_size` ranks.

    Args:
        cfg: the trainer's config.
        world_size: ranks of the run.
        cuda: the run is on GPUs (CUDA fusions on, allocator margin counted).
        transformer_impl: overrides an unresolved --transformer-impl (None = auto): TE on GPUs.
    """
    p, t, prec = cfg.parallel, cfg.training, cfg.precision
    impl = prec.transformer_impl or transformer_impl or ("transformer_engine" if cuda
                                                         else "local")
    dp = world_size // p.model_parallel_size
    mbs = t.micro_batch_size
    gbs = t.global_batch_size or mbs * dp
    overlap = p.overlap_grad_reduce if p.overlap_grad_reduce is not None else cuda
    return Layout(
        tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
        vpp=p.virtual_pipeline_model_parallel_size or 1, cp=p.context_parallel_size, dp=dp,
        micro_batch_size=mbs, num_microbatches=max(1, gbs // (mbs * dp)),
        sequence_parallel=p.sequence_parallel,
        recompute_granularity=t.recompute_granularity, recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
        distributed_optimizer=cfg.optim.use_distributed_optimizer,
        dtype=prec.params_dtype, impl=impl, fp8=prec.fp8 is not None,
        cross_entropy_impl=prec.cross_entropy_impl,
        cross_entropy_chunk_size=prec.cross_entropy_chunk_size,
        cp_comm_type=p.cp_comm_type, fused_kernels=cuda, overlap_grad_reduce=overlap,
        offload_modules=tuple(t.offload_modules or ()) if t.fine_grained_activation_offloading
        else ())


def trainer_model(cfg: PretrainConfig, vocab_size: int | None = None) -> ModelConfig:
    """The model the trainer builds: the tokenizer's vocabulary padded as the trainer pads it
    (`vocab_size` None keeps the preset's / --vocab-size)."""
    vocab = vocab_size or cfg.data.vocab_size or cfg.model.vocab_size
    rows = cfg.padded_vocab_size
    return replace(cfg.model, vocab_size=vocab, pad_vocab=True, padded_vocab_rows=rows)
