"""Model chunks wrapped for training, megatron's optimizer and the LR schedule.

One function per concern, in the order the entrypoint calls them:

* `build_training_model`: GPTModel chunks (one per virtual stage) -> Float16Module for
  bf16/fp16 (keeps fp32 logits for the loss) -> megatron DDP (gradient buffers, DP/CP
  reduction, distributed-optimizer sharding). TransformerConfig gets the loss and pipeline
  settings: `calculate_per_token_loss` (loss summed over tokens, gradients divided once by the
  global token count in finalize_model_grads: the only averaging that is exact across
  micro-batches, DP and CP when ranks hold different numbers of unmasked tokens, and the one
  that gives 0 rather than NaN for a rank with none), `batch_p2p_comm=False` for virtual PP at
  PP=2 (batched p2p swaps tensors when the previous and next peer are the same rank).
* GPU performance defaults (`performance_settings`), as Megatron-LM's: TE's fused RoPE,
  gradient-accumulation fusion into `main_grad` and overlapped DP gradient reduction are on
  with CUDA wherever their kernels exist, and off on CPU (no kernels; overlap buys nothing on
  gloo and the equivalence tests want the plain order). `--no-rope-fusion`,
  `--no-gradient-accumulation-fusion`, `--no-overlap-grad-reduce` turn them off;
  `--overlap-grad-reduce` turns overlap on anywhere (tested on CPU for equivalence).
* `build_optimizer`: megatron-core's Adam (torch AdamW off-GPU, TE/apex fused on GPU),
  decoupled weight decay, gradient clipping, distributed optimizer.
* `build_scheduler`: OptimizerParamScheduler counted in samples, as Megatron-LM does.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_longctx.config.dtypes import torch_dtype
from megatron_longctx.config.training import PretrainConfig


def grad_accum_fusion_kernel_available(transformer_impl: str) -> bool:
    """Whether fused weight-gradient accumulation can be turned on for this layer spec.

    Both specs need apex's `fused_weight_gradient_mlp_cuda`: TE's linear layers bring their
    own fused accumulation, but `GPTModel.output_layer` is megatron's local
    ColumnParallelLinear under either spec, and its constructor raises when the flag is on
    and that kernel is missing (megatron-core 0.16.1 `tensor_parallel/layers.py`). A
    pip-installed TE without apex (the `gpu` extra) therefore runs unfused; the NGC image
    ships apex. `transformer_impl` is kept so a later spec without a local output layer can
    answer differently.
    """
    del transformer_impl  # the same answer for both specs (see above)
    if not torch.cuda.is_available():
        return False
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def performance_settings(cfg: PretrainConfig, *, cuda: bool | None = None,
                         have_te: bool | None = None,
                         grad_fusion_kernel: bool | None = None) -> dict[str, bool]:
    """The GPU performance switches after their defaults are resolved (None = auto).

    Returns apply_rope_fusion, gradient_accumulation_fusion and overlap_grad_reduce. The
    keyword arguments override detection (tests)."""
    from megatron_longctx.model.build import te_available

    cuda = torch.cuda.is_available() if cuda is None else cuda
    have_te = te_available() if have_te is None else have_te
    if grad_fusion_kernel is None:
        grad_fusion_kernel = grad_accum_fusion_kernel_available(cfg.precision.transformer_impl)
    prec, par = cfg.precision, cfg.parallel
    rope = prec.apply_rope_fusion
    grad = prec.gradient_accumulation_fusion
    overlap = par.overlap_grad_reduce
    return {
        "apply_rope_fusion": (cuda and have_te) if rope is None else rope,
        "gradient_accumulation_fusion": grad_fusion_kernel if grad is None else grad,
        "overlap_grad_reduce": cuda if overlap is None else overlap,
    }


def transformer_overrides(cfg: PretrainConfig) -> dict[str, Any]:
    """TransformerConfig fields the trainer sets on top of model/build.py's."""
    par = cfg.parallel
    vpp = par.virtual_pipeline_model_parallel_size or 1
    overrides: dict[str, Any] = {
        "calculate_per_token_loss": cfg.training.per_token_loss(),
        # A silent wrong result otherwise: at PP=2 with virtual stages the previous and next
        # pipeline peer are the same rank and batch_isend_irecv pairs the tensors wrongly.
        "batch_p2p_comm": not (vpp > 1 and par.pipeline_model_parallel_size == 2),
        "deallocate_pipeline_outputs": True,
    }
    perf = performance_settings(cfg)
    overrides["apply_rope_fusion"] = perf["apply_rope_fusion"]
    if cfg.data.reset_attention_mask and not cfg.data.reset_position_ids:
        # TE's fused THD RoPE restarts positions in every document; global positions need
        # megatron's unfused THD path, which reads the packed row's table at each offset.
        overrides["apply_rope_fusion"] = False
    overrides["gradient_accumulation_fusion"] = perf["gradient_accumulation_fusion"]
    t = cfg.training
    if t.recompute_granularity:
        overrides["recompute_granularity"] = t.recompute_granularity
        if t.recompute_granularity == "full":
            overrides["recompute_method"] = t.recompute_method
            overrides["recompute_num_layers"] = t.recompute_num_layers
    if t.fine_grained_activation_offloading:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--fine-grained-activation-offloading needs CUDA (megatron's "
                             "offload manager runs on CUDA streams and events)")
        overrides["fine_grained_activation_offloading"] = True
        overrides["offload_modules"] = list(t.offload_modules or [])
    if cfg.attention_backend:
        from megatron.core.transformer.enums import AttnBackend

        overrides["attention_backend"] = AttnBackend[cfg.attention_backend]
    return overrides


def build_training_model(cfg: PretrainConfig) -> list[Any]:
    """This rank's DDP-wrapped model chunks (Float16Module inside for bf16/fp16)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.transformer.module import Float16Module

    from megatron_longctx.model.build import build_model_chunks

    chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.precision,
                                **transformer_overrides(cfg))
    config = chunks[0].config
    if cfg.precision.params_dtype != "fp32":
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    overlap = performance_settings(cfg)["overlap_grad_reduce"]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap,
        use_distributed_optimizer=cfg.optim.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                # Megatron-LM: only the first chunk's buffers are bucketed.
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ([w.no_sync for w in wrapped] if len(wrapped) > 1
                           else wrapped[0].no_sync)
    if overlap:
        # Megatron-LM's align_grad_reduce: the pipeline schedule starts each chunk's gradient
        # reduction when its last micro-batch's backward is done.
        config.grad_sync_func = ([w.start_grad_sync for w in wrapped] if len(wrapped) > 1
                                 else wrapped[0].start_grad_sync)
    return wrapped


def build_optimizer(cfg: PretrainConfig, model_chunks: list[Any]) -> Any:
    """megatron-core's Adam over the chunks; installs the loss-scale hook on the config."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o, prec = cfg.optim, cfg.precision
    config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=prec.params_dtype == "bf16",
        fp16=prec.params_dtype == "fp16",
        params_dtype=torch_dtype(prec.params_dtype),
        use_distributed_optimizer=o.use_distributed_optimizer,
        # fp16 only: dynamic loss scaling (bf16 and fp32 need none).
        loss_scale=None,
        initial_loss_scale=2**16,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    model_chunks[0].config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(cfg: PretrainConfig, optimizer: Any, global_batch_size: int) -> Any:
    """Warmup then constant / cosine / linear decay to --min-lr, counted in samples."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    decay_iters = o.lr_decay_iters or cfg.training.train_iters
    warmup = o.lr_warmup_iters * global_batch_size
    decay = max(decay_iters * global_batch_size, warmup + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.lr_warmup_iters else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
