"""The one place that turns our configs into a megatron-core GPTModel.

Choices made here and nowhere else (Megatron's gpt_layer_specs pattern):

* Layer spec: Transformer Engine's (`get_gpt_layer_with_transformer_engine_spec`: fused
  norm+linear, TE attention with p2p/a2a CP, FP8) when `--transformer-impl transformer_engine`
  and TE imports; otherwise the local spec with our `SDPACoreAttention` (CP by K/V all-gather,
  no s x s masks) and our `RMSNorm` (the stock WrappedTorchNorm asserts under
  --sequence-parallel). TE is imported lazily, so CPU machines never touch it.
* The final norm: a TransformerBlockSubmodules spec, because a bare layer spec makes megatron
  pick its module-global LayerNormImpl (WrappedTorchNorm without TE/apex).
* TransformerConfig: LLaMA settings (RMSNorm, SwiGLU, no biases, untied embeddings, no
  dropout), CPU-safe fusions off without CUDA, FP8 fields passed through after validation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F

from megatron_longctx.config.dtypes import torch_dtype
from megatron_longctx.config.model import (
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    validate_all,
)


@functools.cache
def te_available() -> bool:
    """Whether transformer_engine.pytorch imports (any failure counts as absent: an installed
    TE wrapper without its CUDA library raises OSError/RuntimeError, not ImportError)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def te_version() -> str | None:
    """The installed transformer-engine version from package metadata (no import), or None."""
    from importlib import metadata

    for name in ("transformer-engine", "transformer_engine"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def default_device() -> torch.device:
    """The device a built model lives on: this process's current CUDA device when there is
    one (torchrun/srun give each rank its own; parallel.init sets it), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig | None = None,
    *,
    have_te: bool | None = None,
    use_cpu_initialization: bool | None = None,
    **overrides: Any,
) -> Any:
    """Validate the configs together and build megatron's TransformerConfig.

    Works without TE (FP8 fields are plain TransformerConfig fields; `precision.validate`
    rejects FP8 unless TE is available, naming --fp8-format/--transformer-impl).

    Args:
        model: architecture.
        parallel: TP/PP/VPP/CP/SP.
        precision: dtype, implementation and FP8; default fp32 local.
        have_te: override TE detection (tests).
        use_cpu_initialization: build full weights on CPU from the CPU generator and scatter
            them; default True without CUDA. It makes initial weights identical for any TP
            size (the equivalence tests rely on it) at the cost of one full-size fp32 weight
            in host memory during init (LLaMA-2 7B: the 500 MB embedding is the largest).
        **overrides: any other TransformerConfig field (e.g. recompute_granularity).

    Returns:
        megatron.core.transformer.TransformerConfig.
    """
    from megatron.core.transformer import TransformerConfig

    from megatron_longctx.model.rotary import softmax_scale_for

    precision = precision or PrecisionConfig()
    have_te = te_available() if have_te is None else have_te
    validate_all(model, parallel, precision, te_available=have_te)
    precision = dataclasses.replace(precision,
                                    transformer_impl=precision.implementation(have_te))
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        **LLAMA_SETTINGS,
        **_shape_kwargs(model),
        **_parallel_kwargs(parallel),
        **_precision_kwargs(precision, cuda),
        "use_cpu_initialization": (not cuda) if use_cpu_initialization is None
        else use_cpu_initialization,
        # yarn / longrope attention scaling m folded into the softmax scale (model/rotary.py)
        "softmax_scale": softmax_scale_for(model),
        "perform_initialization": True,
        # [] = whole layer, the non-deprecated spelling of the default "full" (which warns).
        "cuda_graph_scope": [],
    }
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


#: What makes the model LLaMA: RMSNorm, SwiGLU, no biases (Q/K/V biases for Qwen2:
#: ModelConfig.add_qkv_bias), no dropout.
LLAMA_SETTINGS: dict[str, Any] = {
    "normalization": "RMSNorm", "gated_linear_unit": True, "activation_func": F.silu,
    "add_bias_linear": False, "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
}


def _shape_kwargs(model: ModelConfig) -> dict[str, Any]:
    return {
        "num_layers": model.num_layers, "hidden_size": model.hidden_size,
        "ffn_hidden_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "num_query_groups": model.query_groups, "kv_channels": model.head_dim,
        "add_qkv_bias": model.add_qkv_bias,
        "layernorm_epsilon": model.norm_epsilon, "init_method_std": model.init_method_std,
    }


def _parallel_kwargs(parallel: ParallelConfig) -> dict[str, Any]:
    vpp = parallel.virtual_pipeline_model_parallel_size
    return {
        "tensor_model_parallel_size": parallel.tensor_model_parallel_size,
        "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
        "virtual_pipeline_model_parallel_size": vpp if vpp and vpp > 1 else None,
        "context_parallel_size": parallel.context_parallel_size,
        "cp_comm_type": parallel.cp_comm_type,
        "sequence_parallel": parallel.sequence_parallel,
    }


def _precision_kwargs(precision: PrecisionConfig, cuda: bool) -> dict[str, Any]:
    dtype = torch_dtype(precision.params_dtype)
    kwargs: dict[str, Any] = {
        "params_dtype": dtype, "pipeline_dtype": dtype,
        "bf16": precision.params_dtype == "bf16", "fp16": precision.params_dtype == "fp16",
        "transformer_impl": precision.transformer_impl,
        # Fusions need CUDA kernels (apex/TE or jit-compiled CUDA); off on CPU. The trainer
        # turns RoPE and gradient-accumulation fusion on where they exist (training/setup.py).
        "bias_activation_fusion": cuda, "masked_softmax_fusion": False,
        "bias_dropout_fusion": cuda, "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False, "persist_layer_norm": False,
    }
    if precision.fp8 is not None:
        kwargs.update(
            fp8=precision.fp8,
            fp8_recipe=precision.fp8_recipe,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
            fp8_dot_product_attention=precision.fp8_dot_product_attention,
        )
    return kwargs


def get_local_layer_spec() -> Any:
    """Megatron's local GPT layer spec with SDPACoreAttention and SP-capable RMSNorm."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    from megatron_longctx.model.attention import SDPACoreAttention
    from megatron_longctx.model.norm import RMSNorm

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPACoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                         linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def get_te_layer_spec() -> Any:
    """Transformer Engine layer spec (imported lazily; needs TE)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec(num_experts=None, qk_layernorm=False)


def get_block_spec(config: Any, use_te: bool, vp_stage: int | None = None) -> Any:
    """Decoder block spec: this stage's layers plus the final norm."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        layer, norm = get_te_layer_spec(), TENorm
    else:
        from megatron_longctx.model.norm import RMSNorm

        layer, norm = get_local_layer_spec(), RMSNorm
    num = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * num, layer_norm=norm),
    )


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig | None = None,
    *,
    vp_stage: int | None = None,
    config: Any = None,
    device: torch.device | str | None = None,
    **config_overrides: Any,
) -> Any:
    """Build this rank's GPTModel (one virtual stage when `vp_stage` is given).

    Needs megatron's parallel state (parallel.init.initialize_distributed). pre_process /
    post_process (embedding / output layer) follow the PP stage (and virtual stage).

    Every parameter and buffer ends on `device` (default `default_device()`), as Megatron-LM's
    get_model moves each chunk with `.cuda()`: megatron allocates its linear layers on the GPU
    only without --use-cpu-initialization, and nothing else would move a CPU-initialised
    model (the distributed optimizer's parameter remapping used to hide this; bf16 with the
    plain optimizer then failed megatron's CUDA type check). The converter passes "cpu".
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    precision = precision or PrecisionConfig()
    if config is None:
        config = build_transformer_config(model, parallel, precision, **config_overrides)
    use_te = precision.transformer_impl == "transformer_engine"
    vpp_on = parallel_state.get_virtual_pipeline_model_parallel_world_size() is not None
    stage = vp_stage if vpp_on else None
    vocab = model.padded_vocab(parallel.tensor_model_parallel_size)
    loss_kwargs: dict[str, Any] = {}
    model_cls = GPTModel
    if precision.cross_entropy_impl == "chunked":
        from megatron_longctx.model.loss import ChunkedLossGPTModel

        model_cls = ChunkedLossGPTModel
        loss_kwargs = {"unpadded_vocab_size": model.vocab_size,
                       "cross_entropy_chunk_size": precision.cross_entropy_chunk_size}
    gpt = model_cls(
        **loss_kwargs,
        config=config,
        transformer_layer_spec=get_block_spec(config, use_te, vp_stage=stage),
        vocab_size=vocab,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=not vpp_on,
                                                           vp_stage=stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=not vpp_on,
                                                           vp_stage=stage),
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
        vp_stage=stage,
    )
    # Our rotary module (every RoPE scheme, model/rotary.py) replaces megatron's: both layer
    # specs apply the angles it returns, so the TE path gets the same frequencies.
    from megatron_longctx.model.rotary import LongContextRotaryEmbedding

    gpt.rotary_pos_emb = LongContextRotaryEmbedding(
        model.rope_spec(), model.rotary_dim, rotary_interleaved=config.rotary_interleaved)
    return gpt.to(default_device() if device is None else torch.device(device))


def build_model_chunks(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig | None = None,
    **config_overrides: Any,
) -> list[Any]:
    """All model chunks of this rank: one per virtual pipeline stage (one without VPP)."""
    precision = precision or PrecisionConfig()
    config = build_transformer_config(model, parallel, precision, **config_overrides)
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    if vpp == 1:
        return [build_model(model, parallel, precision, config=config)]
    return [build_model(model, parallel, precision, vp_stage=i, config=config)
            for i in range(vpp)]


def unwrap_model(chunk: Any) -> Any:
    """The GPTModel inside DDP / Float16Module (each keeps it as `.module`). Checkpoints hold
    its keys, so fp32 and bf16 runs and converted checkpoints share one key space."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk

