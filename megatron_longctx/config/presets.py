"""Named model shapes: the real LLaMA ones for launch scripts and tiny ones for tests/demo.

The real shapes are those of the released Hugging Face checkpoints (config.json), so a converted
checkpoint loads without reshaping. Sequence length and RoPE base are left at the pretraining
values; the 128K recipes change them in one place (`with_context`), following Fu et al.: raise
the RoPE base so it covers > 128K positions, then continue training. `llama3.1-8b` keeps its
released `llama3` RoPE scaling (docs/rope.md: continue a model with the scheme it was trained
with).
"""

from __future__ import annotations

from dataclasses import replace

from megatron_longctx.config.model import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # 6.7B parameters; 4K pretraining context, MHA.
    "llama2-7b": ModelConfig(
        num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
        num_query_groups=32, vocab_size=32000, max_position_embeddings=4096, seq_length=4096,
        rotary_base=10000, norm_epsilon=1e-5,
    ),
    # 13.0B parameters; MHA.
    "llama2-13b": ModelConfig(
        num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40,
        num_query_groups=40, vocab_size=32000, max_position_embeddings=4096, seq_length=4096,
        rotary_base=10000, norm_epsilon=1e-5,
    ),
    # 8.0B parameters; GQA with 8 KV heads (4x smaller KV than MHA: 128 KB/token at bf16).
    "llama3-8b": ModelConfig(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, vocab_size=128256, max_position_embeddings=8192, seq_length=8192,
        rotary_base=500000, norm_epsilon=1e-5,
    ),
    # LLaMA-3.1 / 3.2 8B: llama3 RoPE scaling (factor 8, low / high frequency factors 1 / 4,
    # original length 8192) over base 500000, 128K positions; continue it with this scheme.
    "llama3.1-8b": ModelConfig(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, vocab_size=128256, max_position_embeddings=131072,
        seq_length=8192, rotary_base=500000, norm_epsilon=1e-5, rope_type="llama3",
        rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
        rope_original_max_position_embeddings=8192,
    ),
    # ~0.2M parameters: 2 layers, GQA 4 heads / 2 groups; a CPU forward+backward at 64 tokens
    # takes a few ms, so multi-process equivalence tests stay fast.
    "tiny": ModelConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
        num_query_groups=2, vocab_size=512, max_position_embeddings=4096, seq_length=64,
        rotary_base=10000,
    ),
    # ~3.5M parameters for the CPU demo (8 heads so TP up to 8 divides).
    "tiny-demo": ModelConfig(
        num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=8,
        num_query_groups=4, vocab_size=2048, max_position_embeddings=8192, seq_length=1024,
        rotary_base=10000,
    ),
    # ~1.5M parameters (70% in the embedding and output layers): the shape `make demo` trains
    # from scratch on 2 CPU cores (~20K tokens/s at 64 tokens with the real trainer). With RoPE
    # base 100 at its 64-token stage 1, 7 of the 16 rotary pairs have wavelengths beyond the
    # training length (LLaMA-2, base 10,000 at 4K: 18 of 64); with base 10,000 it would be 11
    # of 16, and such a model already half-works at 8x its training length before any
    # extension, which hides the effect the demo shows (docs/demo.md).
    "demo": ModelConfig(
        num_layers=2, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4,
        num_query_groups=4, vocab_size=4096, max_position_embeddings=8192, seq_length=64,
        rotary_base=100,
    ),
}

#: Preset names, for --model-preset's help.
PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset (callers may mutate it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name])


def with_context(cfg: ModelConfig, seq_length: int, rotary_base: int | None = None) -> ModelConfig:
    """The same model at a new context: seq_length, max_position_embeddings and RoPE base.

    Args:
        cfg: the base shape.
        seq_length: new training length (e.g. 131072).
        rotary_base: new RoPE base; None keeps the preset's. Fu et al.'s released 7B uses an
            effective base of ~2.1M at 80K (dynamic NTK, factor 10).
    """
    return replace(
        cfg,
        seq_length=seq_length,
        max_position_embeddings=max(seq_length, cfg.max_position_embeddings),
        rotary_base=cfg.rotary_base if rotary_base is None else rotary_base,
    )


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count of the LLaMA architecture (untied embeddings, no biases)."""
    h, f, v, n = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.num_layers
    kv = cfg.query_groups * cfg.head_dim
    attn = h * h + 2 * h * kv + h * h
    mlp = 3 * h * f
    norms = 2 * h
    emb = v * h * (2 if cfg.untie_embeddings_and_output_weights else 1)
    return n * (attn + mlp + norms) + emb + h
