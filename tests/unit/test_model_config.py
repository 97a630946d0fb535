"""Model/parallel/precision configs: validation messages name Megatron flags, presets have the
real shapes, and the FP8 TransformerConfig fields build without Transformer Engine."""

from __future__ import annotations

from dataclasses import replace

import pytest

from megatron_longctx.config.model import (
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    validate_all,
)
from megatron_longctx.config.presets import PRESETS, count_parameters, get_preset, with_context


@pytest.mark.parametrize(
    ("name", "shape", "params_b"),
    [
        ("llama2-7b", (32, 4096, 11008, 32, 32, 32000, 10000), 6.74),
        ("llama2-13b", (40, 5120, 13824, 40, 40, 32000, 10000), 13.02),
        ("llama3-8b", (32, 4096, 14336, 32, 8, 128256, 500000), 8.03),
        ("llama3.1-8b", (32, 4096, 14336, 32, 8, 128256, 500000), 8.03),
    ],
)
def test_real_presets(name: str, shape: tuple, params_b: float) -> None:
    cfg = get_preset(name)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads,
            cfg.query_groups, cfg.vocab_size, cfg.rotary_base) == shape
    assert cfg.untie_embeddings_and_output_weights
    assert abs(count_parameters(cfg) / 1e9 - params_b) < 0.01
    cfg.validate()


def test_tiny_preset_and_copies() -> None:
    tiny = get_preset("tiny")
    assert (tiny.num_layers, tiny.hidden_size, tiny.num_attention_heads, tiny.query_groups,
            tiny.ffn_hidden_size, tiny.vocab_size) == (2, 64, 4, 2, 176, 512)
    tiny.num_layers = 99
    assert PRESETS["tiny"].num_layers == 2
    for name in PRESETS:
        get_preset(name).validate()
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        get_preset("gpt5")


def test_llama31_preset_matches_the_released_rope() -> None:
    spec = get_preset("llama3.1-8b").rope_spec()
    assert (spec.rope_type, spec.theta, spec.factor, spec.low_freq_factor,
            spec.high_freq_factor, spec.original_max_position_embeddings) == (
        "llama3", 500000.0, 8.0, 1.0, 4.0, 8192)


def test_with_context_raises_base_and_positions() -> None:
    long = with_context(get_preset("llama2-7b"), 131072, rotary_base=5_000_000)
    assert (long.seq_length, long.max_position_embeddings, long.rotary_base) == (
        131072, 131072, 5_000_000)


@pytest.mark.parametrize(
    ("model_changes", "parallel", "message"),
    [
        ({}, ParallelConfig(tensor_model_parallel_size=3),
         r"--num-attention-heads \(32\) must be divisible by --tensor-model-parallel-size \(3\)"),
        ({"num_query_groups": 8}, ParallelConfig(tensor_model_parallel_size=16),
         r"--num-query-groups \(8\) must be divisible by --tensor-model-parallel-size \(16\)"),
        ({"num_query_groups": 2}, ParallelConfig(tensor_model_parallel_size=4),
         r"--num-query-groups \(2\) must be divisible by --tensor-model-parallel-size \(4\)"),
        ({}, ParallelConfig(pipeline_model_parallel_size=3),
         r"--num-layers \(32\) must be divisible by --pipeline-model-parallel-size \(3\)"),
        ({"seq_length": 4004}, ParallelConfig(context_parallel_size=4),
         r"--seq-length \(4004\) must be divisible by 2 x --context-parallel-size \(4\) = 8"),
        ({"seq_length": 4080}, ParallelConfig(tensor_model_parallel_size=8,
                                              sequence_parallel=True, context_parallel_size=2),
         r"--seq-length \(4080\).*2 x --context-parallel-size \(2\) x "
         r"--tensor-model-parallel-size \(8\) with --sequence-parallel = 32"),
        ({}, ParallelConfig(sequence_parallel=True),
         r"--sequence-parallel needs --tensor-model-parallel-size > 1"),
        ({}, ParallelConfig(cp_comm_type="ring"), r"--cp-comm-type must be one of"),
        ({"num_attention_heads": 30}, ParallelConfig(),
         r"--hidden-size \(4096\) must be divisible by --num-attention-heads \(30\)"),
        ({"num_query_groups": 5}, ParallelConfig(),
         r"--num-attention-heads \(32\) must be divisible by --num-query-groups \(5\)"),
        ({"seq_length": 8192}, ParallelConfig(),
         r"--seq-length \(8192\) must be <= --max-position-embeddings \(4096\)"),
        ({"rope_scaling": True, "seq_len_interpolation_factor": 4.0}, ParallelConfig(),
         r"--use-rope-scaling and --rotary-seq-len-interpolation-factor are exclusive"),
    ],
)
def test_validation_messages_name_flags(model_changes: dict, parallel: ParallelConfig,
                                        message: str) -> None:
    model = replace(get_preset("llama2-7b"), **model_changes)
    with pytest.raises(ValueError, match=message):
        validate_all(model, parallel)


def test_world_size_check_formula() -> None:
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                              context_parallel_size=2)
    parallel.validate(world_size=16)
    with pytest.raises(ValueError, match=r"world size \(12\) must be divisible by .* = 8"):
        parallel.validate(world_size=12)
    with pytest.raises(ValueError, match="needs --pipeline-model-parallel-size > 1"):
        ParallelConfig(virtual_pipeline_model_parallel_size=2).validate()


def test_fp8_rejected_without_te() -> None:
    fp8 = PrecisionConfig(params_dtype="bf16", transformer_impl="local", fp8="hybrid")
    with pytest.raises(ValueError, match=r"--fp8-format hybrid needs --transformer-impl "
                                         r"transformer_engine"):
        fp8.validate(te_available=False)
    te = replace(fp8, transformer_impl="transformer_engine")
    with pytest.raises(ValueError, match="--fp8-format hybrid needs --transformer-impl "
                                         "transformer_engine with Transformer Engine installed"):
        te.validate(te_available=False)
    with pytest.raises(ValueError, match="--transformer-impl transformer_engine needs "
                                         "Transformer Engine installed"):
        replace(te, fp8=None).validate(te_available=False)
    te.validate(te_available=True)
    with pytest.raises(ValueError, match="--fp8-format must be one of"):
        replace(te, fp8="e5m2").validate(te_available=True)
    with pytest.raises(ValueError, match="--fp8-dot-product-attention needs --fp8-format"):
        PrecisionConfig(fp8_dot_product_attention=True).validate(te_available=True)
    with pytest.raises(ValueError, match="expects --bf16 or --fp16"):
        replace(te, params_dtype="fp32").validate(te_available=True)


def test_transformer_config_fp8_fields_without_te() -> None:
    import torch

    from megatron_longctx.model.build import build_transformer_config, te_available

    assert te_available() is False  # CPU CI never installs Transformer Engine
    # FP8 attention needs LLaMA's head dim 128 (TE's fused FP8 attention on sm90).
    model = replace(get_preset("tiny"), hidden_size=256, num_attention_heads=2)
    parallel = ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2,
                              sequence_parallel=True, cp_comm_type="a2a")
    precision = PrecisionConfig(params_dtype="bf16", transformer_impl="transformer_engine",
                                fp8="e4m3", fp8_recipe="delayed", fp8_amax_history_len=1024,
                                fp8_amax_compute_algo="max", fp8_dot_product_attention=True)
    cfg = build_transformer_config(model, parallel, precision, have_te=True)
    assert (cfg.fp8, cfg.fp8_recipe, cfg.fp8_amax_history_len, cfg.fp8_amax_compute_algo,
            cfg.fp8_dot_product_attention) == ("e4m3", "delayed", 1024, "max", True)
    assert cfg.bf16 and cfg.params_dtype == torch.bfloat16
    assert (cfg.tensor_model_parallel_size, cfg.context_parallel_size, cfg.sequence_parallel,
            cfg.cp_comm_type) == (2, 2, True, "a2a")
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.normalization, cfg.gated_linear_unit,
            cfg.add_bias_linear) == (2, 128, "RMSNorm", True, False)
    with pytest.raises(ValueError, match="--fp8-format e4m3 needs --transformer-impl"):
        build_transformer_config(model, parallel, precision)  # real detection: no TE here


def test_local_fp32_transformer_config() -> None:
    import torch

    from megatron_longctx.config.model import padded_vocab_size
    from megatron_longctx.model.build import build_transformer_config

    cfg = build_transformer_config(get_preset("llama3-8b"), ParallelConfig())
    assert cfg.fp8 is None and cfg.params_dtype == torch.float32 and not cfg.bf16
    assert cfg.use_cpu_initialization == (not torch.cuda.is_available())
    assert padded_vocab_size(32000, 8) == 32768 and padded_vocab_size(128256, 1) == 128256


def test_model_config_rejects_nonpositive() -> None:
    with pytest.raises(ValueError, match="--num-layers must be positive"):
        ModelConfig(num_layers=0, hidden_size=64, ffn_hidden_size=1,
                    num_attention_heads=4).validate()


# --- GPU-only combinations that used to run silently wrong -------------------------
@pytest.mark.parametrize("parallel,message", [
    (ParallelConfig(context_parallel_size=4, cp_comm_type="a2a+p2p"),
     r"--cp-comm-type a2a\+p2p needs --hierarchical-context-parallel-sizes"),
    (ParallelConfig(context_parallel_size=4, cp_comm_type="a2a+p2p",
                    hierarchical_context_parallel_sizes=(2, 4)),
     r"--hierarchical-context-parallel-sizes 2 4 must be two sizes .* "
     r"--context-parallel-size \(4\)"),
    (ParallelConfig(context_parallel_size=4, cp_comm_type="p2p",
                    hierarchical_context_parallel_sizes=(2, 2)),
     r"--hierarchical-context-parallel-sizes is only used with --cp-comm-type a2a\+p2p"),
], ids=["a2a+p2p-without-sizes", "sizes-product", "sizes-without-a2a+p2p"])
def test_hierarchical_cp_needs_its_sizes(parallel: ParallelConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parallel.validate()


def test_hierarchical_cp_sizes_accepted() -> None:
    ParallelConfig(context_parallel_size=4, cp_comm_type="a2a+p2p",
                   hierarchical_context_parallel_sizes=(2, 2)).validate(world_size=8)


def test_fp8_attention_needs_llama_head_dim_and_a_fp8_cp_path() -> None:
    te_fp8 = PrecisionConfig(params_dtype="bf16", transformer_impl="transformer_engine",
                             fp8="hybrid", fp8_dot_product_attention=True)
    llama = get_preset("llama2-7b")  # head dim 128
    validate_all(llama, ParallelConfig(context_parallel_size=2), te_fp8, te_available=True)
    with pytest.raises(ValueError, match=r"--fp8-dot-product-attention needs head dim 128 "
                                         r"\(--hidden-size / --num-attention-heads = 16\)"):
        validate_all(get_preset("tiny"), ParallelConfig(), te_fp8, te_available=True)
    with pytest.raises(ValueError, match="--fp8-dot-product-attention does not run in FP8 "
                                         "with --cp-comm-type all_gather"):
        validate_all(llama, ParallelConfig(context_parallel_size=2, cp_comm_type="all_gather"),
                     te_fp8, te_available=True)


def test_rope_fusion_needs_te() -> None:
    with pytest.raises(ValueError, match="RoPE fusion needs Transformer Engine"):
        PrecisionConfig(apply_rope_fusion=True).validate(te_available=False)
    PrecisionConfig(apply_rope_fusion=True).validate(te_available=True)
