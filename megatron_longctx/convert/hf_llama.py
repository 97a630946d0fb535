"""Hugging Face LLaMA (`LlamaForCausalLM`; `MistralForCausalLM` without a sliding window, the
same architecture) <-> megatron-core GPTModel: names, tensors, configs.

Mapping (HF name -> checkpoint name in docs/checkpoint-format.md). Per layer L the prefixes are
`model.layers.L.` (HF) and `decoder.layers.L.` (megatron):

| HF | Megatron | transform |
|---|---|---|
| model.embed_tokens.weight [V, h] | embedding.word_embeddings.weight [Vp, h] | rows >= V zero |
| input_layernorm.weight | self_attention.linear_qkv.layer_norm_weight | copy |
| self_attn.{q,k,v}_proj.weight | self_attention.linear_qkv.weight | per group: [q heads, k, v] |
| self_attn.o_proj.weight | self_attention.linear_proj.weight | copy |
| post_attention_layernorm.weight | mlp.linear_fc1.layer_norm_weight | copy |
| mlp.{gate,up}_proj.weight | mlp.linear_fc1.weight | [gate; up] |
| mlp.down_proj.weight | mlp.linear_fc2.weight | copy |
| model.norm.weight | decoder.final_layernorm.weight | copy |
| lm_head.weight (untied only) | output_layer.weight [Vp, h] | rows >= V zero |

Both sides use rotate-half RoPE (HF's checkpoints are already permuted for it; megatron's
`rotary_interleaved=False`), so q/k need no permutation. megatron splits its fused QKV output
as [groups, heads_per_group + 2, head_dim] (`SelfAttention.get_query_key_value_tensors`), hence
the interleaved layout; SwiGLU takes act(first half) * second half, hence [gate; up].

Memory: HF -> Megatron builds one TP1/PP1 GPTModel in the checkpoint's dtype without random
initialisation and copies each HF tensor into its slot as it is read (safetensors: one tensor
at a time through `safe_open`; .bin shards memory-mapped), so the peak is the model plus one
tensor. Megatron -> HF loads the model the same way and writes one output shard at a time (peak:
model plus one shard, `--max-shard-size`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_longctx.config.dtypes import DTYPE_NAMES, HF_DTYPE_NAMES, PARAMS_DTYPES, torch_dtype
from megatron_longctx.config.model import (
    ROPE_PARAMETER_FLAGS,
    ROPE_TYPES,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    RopeSpec,
    padded_vocab_size,
)

#: HF model_type -> its causal-LM class. Mistral without a sliding window (v0.2 and later,
#: Mistral-Nemo: `sliding_window: null`) is a LLaMA under another name: same tensors, RMSNorm,
#: SwiGLU, GQA and RoPE, so it converts and exports back as itself. Qwen2 (Qwen2.5) is a LLaMA
#: with biases on Q/K/V (`--add-qkv-bias`) and, unless `use_sliding_window`, full attention.
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}
#: HF rope parameter -> ModelConfig field (model/rotary.py implements every HF rope_type of a
#: LLaMA: default, linear, dynamic, yarn, llama3, longrope).
HF_ROPE_FIELDS = {
    "factor": "rope_scaling_factor",
    "original_max_position_embeddings": "rope_original_max_position_embeddings",
    "low_freq_factor": "rope_low_freq_factor", "high_freq_factor": "rope_high_freq_factor",
    "beta_fast": "yarn_beta_fast", "beta_slow": "yarn_beta_slow", "mscale": "yarn_mscale",
    "mscale_all_dim": "yarn_mscale_all_dim", "attention_factor": "rope_attention_factor",
    "short_factor": "longrope_short_factor", "long_factor": "longrope_long_factor",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
CONVERT_SOURCE = "convert_checkpoint.py hf-to-megatron"
# Buffers some older HF checkpoints saved; they are recomputed from the config.
_IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


class ConversionError(ValueError):
    """Unsupported or inconsistent input; the message names the file and key."""


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of a Hugging Face model directory, as a plain dict."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: not a directory")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json; not a Hugging Face model directory")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return cfg


#: RoPE parameters that must be positive (zero or negative is no rotation or a zero
#: attention scale: NaN or empty answers); every numeric one must be finite.
_POSITIVE_ROPE_KEYS = ("factor", "attention_factor", "original_max_position_embeddings",
                       "low_freq_factor", "high_freq_factor", "short_factor", "long_factor")


def _check_physical(theta: Any, params: dict[str, Any], source: str, where: str) -> float:
    """`theta` as a float after refusing non-finite or non-positive RoPE values (json.loads
    reads `NaN` and `Infinity`; transformers accepts them and the model then answers NaN)."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or \
            not math.isfinite(theta) or theta <= 0:
        raise ConversionError(f"{where}: rope_theta must be a finite positive number, got "
                              f"{theta!r}")
    for key, value in params.items():
        if key in ("rope_type", "type", "rope_theta") or value is None or isinstance(value, bool):
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        if not all(math.isfinite(v) for v in values):
            raise ConversionError(f"{where}: {source}.{key} must be finite, got {value!r}")
        if key in _POSITIVE_ROPE_KEYS and not all(v > 0 for v in values):
            raise ConversionError(f"{where}: {source}.{key} must be positive, got {value!r}")
    return float(theta)


def hf_rope_source(hf: dict[str, Any], where: str) -> tuple[float, dict[str, Any]]:
    """(theta, rope dict) as transformers reads config.json (`RotaryEmbeddingConfigMixin.
    convert_rope_params_to_dict`, transformers 5): a non-empty `rope_scaling` (4.x spelling)
    takes precedence over `rope_parameters` (5.x spelling); `rope_theta` comes from the chosen
    dict, else the top level, else 10000. Non-finite or non-positive values are refused.

    Raises:
        ConversionError: naming the file and the key.
    """
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise ConversionError(f"{where}: {key} must be an object or null")
    source = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(source) or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return _check_physical(theta, params, source, where), params


def _hf_rope(hf: dict[str, Any], where: str) -> tuple[float, str, dict[str, Any]]:
    """(theta, rope_type, parameters) from either config style (`hf_rope_source`)."""
    theta, params = hf_rope_source(hf, where)
    rope_type = params.get("rope_type", params.get("type", "default"))
    return theta, str(rope_type), params


def sliding_window_of(hf: dict[str, Any]) -> int | None:
    """The sliding window transformers applies to some layer, or None (full attention):
    Mistral reads `sliding_window` (default 4096 when absent) and ignores
    `use_sliding_window`; Qwen2 applies it only with `use_sliding_window` (default false) to
    the layers `layer_types` marks (default: from `max_window_layers`, 28, on); LLaMA has
    none."""
    model_type = hf.get("model_type")
    if model_type == "mistral":
        return hf.get("sliding_window", 4096)
    if model_type != "qwen2" or not hf.get("use_sliding_window", False):
        return None
    window = hf.get("sliding_window", 4096)
    layers = hf.get("layer_types")
    if isinstance(layers, list):
        return window if "sliding_attention" in layers else None
    slides = int(hf.get("num_hidden_layers", 0)) > int(hf.get("max_window_layers", 28))
    return window if slides else None


def rope_fields_from_hf(hf: dict[str, Any], rope_type: str, params: dict[str, Any],
                        where: str = "config.json") -> dict[str, Any]:
    """ModelConfig RoPE fields (rope_type and its parameters) for an HF rope dict.

    Follows transformers' reading: yarn / llama3 / longrope take the original length from a
    top-level `original_max_position_embeddings` (Phi-3), else the rope dict, else
    `max_position_embeddings`; dynamic NTK grows its base beyond `max_position_embeddings`;
    yarn's beta_fast / beta_slow fall back to 32 / 1 when 0 or null; parameters a type does
    not read are dropped (transformers ignores them too).
    """
    if rope_type not in ROPE_TYPES:
        raise ConversionError(f"{where}: rope type {rope_type!r} not supported; one of "
                              f"{list(ROPE_TYPES)}")
    if rope_type == "default":
        return {}
    fields: dict[str, Any] = {"rope_type": rope_type}
    applies = {field: types for field, (_, types) in ROPE_PARAMETER_FLAGS.items()}
    applies["rope_scaling_factor"] = ROPE_TYPES[1:]
    for key, field in HF_ROPE_FIELDS.items():
        value = params.get(key)
        if value is None or rope_type not in applies[field] or (
                key.startswith("beta_") and not value):
            continue
        fields[field] = (tuple(float(v) for v in value) if key.endswith("_factor")
                         and isinstance(value, (list, tuple)) else value)
    max_pos = int(hf.get("max_position_embeddings", 2048))
    if rope_type == "dynamic":
        fields["rope_original_max_position_embeddings"] = max_pos
    elif rope_type in ("yarn", "llama3", "longrope"):
        fields["rope_original_max_position_embeddings"] = int(
            hf.get("original_max_position_embeddings")
            or params.get("original_max_position_embeddings") or max_pos)
    if rope_type == "yarn" and params.get("truncate") is False:
        fields["yarn_truncate"] = False
    if rope_type in ("linear", "dynamic", "llama3") and "rope_scaling_factor" not in fields:
        raise ConversionError(f"{where}: rope type {rope_type!r} without a factor")
    return fields


def hf_rope_parameters(spec: RopeSpec) -> dict[str, Any] | None:
    """The HF rope dict (without rope_theta) of a scheme; None for default."""
    if spec.rope_type == "default":
        return None
    out: dict[str, Any] = {"rope_type": spec.rope_type}
    if spec.factor is not None:
        out["factor"] = float(spec.factor)
    if spec.rope_type in ("yarn", "llama3", "longrope"):
        out["original_max_position_embeddings"] = spec.original_max_position_embeddings
    if spec.rope_type == "llama3":
        out.update(low_freq_factor=spec.low_freq_factor, high_freq_factor=spec.high_freq_factor)
    if spec.rope_type == "yarn":
        out.update(beta_fast=spec.beta_fast, beta_slow=spec.beta_slow)
        for key in ("mscale", "mscale_all_dim"):
            if getattr(spec, key) is not None:
                out[key] = getattr(spec, key)
        if not spec.truncate:
            out["truncate"] = False
    if spec.attention_factor is not None:
        out["attention_factor"] = spec.attention_factor
    if spec.rope_type == "longrope":
        out.update(short_factor=list(spec.short_factor or ()),
                   long_factor=list(spec.long_factor or ()))
    return out


def _same_rope(base: dict[str, Any], spec: RopeSpec, max_pos: int) -> bool:
    """Whether `base`'s RoPE resolves to `spec` (at `max_pos`, the exported length)."""
    try:
        theta, rope_type, params = _hf_rope(base, "base")
        fields = rope_fields_from_hf({**base, "max_position_embeddings": max_pos}, rope_type,
                                     params)
    except (ConversionError, TypeError, ValueError):
        return False
    if int(base.get("max_position_embeddings", 2048)) != max_pos:
        return False
    probe = ModelConfig(num_layers=1, hidden_size=8, ffn_hidden_size=8, num_attention_heads=1,
                        max_position_embeddings=max_pos, seq_length=1, rotary_base=theta,
                        **fields)  # type: ignore[arg-type]
    try:
        return probe.rope_spec() == dataclasses.replace(spec, max_position_embeddings=max_pos)
    except ValueError:
        return False


def model_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a LLaMA config.json; ConversionError for anything we cannot map.

    RoPE: `rope_theta` -> rotary_base; the rope type and each of its parameters -> rope_type
    and one field each (`rope_fields_from_hf`). Vocabulary padding is on (pad_vocab,
    Megatron-LM's default).
    """
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"{where}: model_type {model_type!r} is not supported; only "
                              + ", ".join(f"{t!r} ({c})" for t, c in MODEL_TYPES.items())
                              + " convert")
    archs = hf.get("architectures") or [MODEL_TYPES[model_type]]
    bad = [a for a in archs if a != MODEL_TYPES[model_type]]
    if bad:
        raise ConversionError(f"{where}: architectures {bad} not supported for model_type "
                              f"{model_type!r}; only [{MODEL_TYPES[model_type]!r}]")
    window = sliding_window_of(hf)
    if window is not None:
        raise ConversionError(f"{where}: sliding_window {window}: sliding-window attention is "
                              "not supported (full causal attention only; Mistral v0.2+ "
                              "configs set it to null)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{where}: hidden_act {act!r} not supported (LLaMA uses 'silu')")
    for flag, what in (("attention_bias", "attention"), ("mlp_bias", "MLP")):
        if hf.get(flag):
            raise ConversionError(f"{where}: {flag}=true: {what} biases are not supported (the "
                                  "megatron LLaMA layers are built without biases)")
    try:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        layers = int(hf["num_hidden_layers"])
        ffn = int(hf["intermediate_size"])
    except KeyError as err:
        raise ConversionError(f"{where}: missing field {err.args[0]!r}") from None
    groups = int(hf.get("num_key_value_heads") or heads)
    head_dim = hf.get("head_dim")
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim <= 0):
        raise ConversionError(f"{where}: head_dim must be a positive integer, got {head_dim!r}")
    # Only a head_dim that differs from hidden/heads becomes --kv-channels (the usual config
    # keeps megatron's derived value, and checkpoints stay comparable with older ones).
    kv_channels = head_dim if head_dim is not None and head_dim * heads != hidden else None
    theta, rope_type, params = _hf_rope(hf, where)
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"{where}: partial_rotary_factor {partial} not supported")
    rope = rope_fields_from_hf(hf, rope_type, params, where)
    max_pos = int(hf.get("max_position_embeddings", 2048))
    cfg = ModelConfig(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
        num_query_groups=groups, kv_channels=kv_channels, add_qkv_bias=model_type == "qwen2",
        vocab_size=int(hf.get("vocab_size", 32000)),
        max_position_embeddings=max_pos, seq_length=max_pos,
        rotary_base=int(theta) if theta.is_integer() else theta,  # type: ignore[arg-type]
        **rope,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        pad_vocab=True,
    )
    try:
        cfg.validate()
    except ValueError as err:
        raise ConversionError(f"{where}: {err}") from None
    return cfg


def hf_params_dtype(hf: dict[str, Any]) -> str:
    """fp32 | bf16 | fp16 from config.json's dtype (transformers 5) or torch_dtype (4.x)."""
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if name not in HF_DTYPE_NAMES:
        raise ConversionError(f"config.json: dtype {name!r} not supported; one of "
                              f"{sorted(HF_DTYPE_NAMES)}")
    return HF_DTYPE_NAMES[name]


def hf_config_from_model(cfg: ModelConfig, dtype: str,
                         base: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json for `cfg`; fields ModelConfig does not hold (token ids, ...) come from `base`.

    `base` is the HF config the checkpoint was converted from (kept in longctx_meta.json as
    `hf_config`); its RoPE and dtype spelling is kept (transformers 5 `rope_parameters` vs 4.x
    `rope_theta` + `rope_scaling`). Without a base both spellings are written, so transformers
    4.43+ and 5.x read the same RoPE.
    """
    if cfg.rotary_percent != 1.0:
        raise ConversionError(f"rotary_percent {cfg.rotary_percent}: HF LLaMA rotates the whole "
                              "head")
    out: dict[str, Any] = dict(base or {
        "attention_dropout": 0.0, "hidden_act": "silu", "pretraining_tp": 1, "use_cache": True,
    })
    for key in ("transformers_version", "_name_or_path"):
        out.pop(key, None)
    # Q/K/V-only biases exist only as Qwen2; otherwise the source's type (LLaMA by default).
    source_type = out.get("model_type")
    if cfg.add_qkv_bias:
        model_type = "qwen2"
    else:
        model_type = source_type if source_type in ("llama", "mistral") else "llama"
    out.update(
        architectures=[MODEL_TYPES[model_type]], model_type=model_type,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups, head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon, initializer_range=cfg.init_method_std,
        tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
    )
    if model_type == "llama":  # only LlamaConfig has bias switches
        out.update(attention_bias=False, mlp_bias=False)
    spec = cfg.rope_spec()
    if spec.rope_type == "dynamic":  # HF's dynamic NTK grows the base beyond this length
        out["max_position_embeddings"] = spec.original_max_position_embeddings
    if base is not None and _same_rope(base, spec, out["max_position_embeddings"]):
        return _with_dtype(out, dtype)  # the scheme is unchanged: keep its spelling as is
    for key in ("rope_parameters", "rope_theta", "rope_scaling",
                "original_max_position_embeddings"):
        out.pop(key, None)
    scaling = hf_rope_parameters(spec)
    v5_style = base is not None and isinstance(base.get("rope_parameters"), dict)
    if v5_style or base is None:
        out["rope_parameters"] = {"rope_type": "default", **(scaling or {}),
                                  "rope_theta": spec.theta}
    if base is None or not v5_style:
        out["rope_theta"] = spec.theta
        out["rope_scaling"] = scaling
    return _with_dtype(out, dtype)


def _with_dtype(out: dict[str, Any], dtype: str) -> dict[str, Any]:
    dtype_keys = [k for k in ("dtype", "torch_dtype") if k in out] or ["dtype", "torch_dtype"]
    for key in dtype_keys:
        out[key] = DTYPE_NAMES[dtype]
    return out


# ----------------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------------
def tensor_map(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """HF tensor name -> (megatron checkpoint name, part), in HF's order.

    Parts: "copy" (whole tensor), "vocab" (the first V rows), "q"/"k"/"v" (one slot of the
    grouped QKV), "gate"/"up" (a half of linear_fc1). See `megatron_region`.
    """
    out: dict[str, tuple[str, str]] = {
        "model.embed_tokens.weight": ("embedding.word_embeddings.weight", "vocab")}
    for i in range(cfg.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv, fc1 = mg + "self_attention.linear_qkv.weight", mg + "mlp.linear_fc1.weight"
        out.update({
            hf + "self_attn.q_proj.weight": (qkv, "q"),
            hf + "self_attn.k_proj.weight": (qkv, "k"),
            hf + "self_attn.v_proj.weight": (qkv, "v"),
        })
        if cfg.add_qkv_bias:
            bias = mg + "self_attention.linear_qkv.bias"
            out.update({hf + f"self_attn.{p}_proj.bias": (bias, p) for p in "qkv"})
        out.update({
            hf + "self_attn.o_proj.weight": (mg + "self_attention.linear_proj.weight", "copy"),
            hf + "mlp.gate_proj.weight": (fc1, "gate"),
            hf + "mlp.up_proj.weight": (fc1, "up"),
            hf + "mlp.down_proj.weight": (mg + "mlp.linear_fc2.weight", "copy"),
            hf + "input_layernorm.weight":
                (mg + "self_attention.linear_qkv.layer_norm_weight", "copy"),
            hf + "post_attention_layernorm.weight":
                (mg + "mlp.linear_fc1.layer_norm_weight", "copy"),
        })
    out["model.norm.weight"] = ("decoder.final_layernorm.weight", "copy")
    if cfg.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = ("output_layer.weight", "vocab")
    return out


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor (same order as `tensor_map`)."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    q, kv = cfg.num_attention_heads * d, cfg.query_groups * d
    by_suffix = {"q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
                 "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,),
                 "o_proj.weight": (h, q), "gate_proj.weight": (f, h), "up_proj.weight": (f, h),
                 "down_proj.weight": (h, f), "layernorm.weight": (h,), "norm.weight": (h,),
                 "embed_tokens.weight": (cfg.vocab_size, h),
                 "lm_head.weight": (cfg.vocab_size, h)}
    out = {}
    for name in tensor_map(cfg):
        suffix = next(s for s in by_suffix if name.endswith(s))
        out[name] = by_suffix[suffix]
    return out


def megatron_region(tensor: torch.Tensor, part: str, cfg: ModelConfig) -> torch.Tensor:
    """The view of a full (TP1) megatron tensor that holds one HF tensor.

    The view has the HF tensor's elements in HF's order: `view.copy_(hf.reshape(view.shape))`
    imports, `view.reshape(hf_shape)` exports. q/k/v views are 4-D/3-D
    ([groups, heads_per_group, head_dim, hidden] / [groups, head_dim, hidden]); of the QKV
    bias, 3-D/2-D (no hidden).
    """
    if part == "copy":
        return tensor
    if part == "vocab":
        return tensor[: cfg.vocab_size]
    if part in ("gate", "up"):
        ffn = cfg.ffn_hidden_size
        return tensor[:ffn] if part == "gate" else tensor[ffn:]
    groups, head_dim = cfg.query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    grouped = tensor.view(groups, per_group + 2, head_dim, *tensor.shape[1:])
    if part == "q":
        return grouped[:, :per_group]
    if part == "k":
        return grouped[:, per_group]
    if part == "v":
        return grouped[:, per_group + 1]
    raise ValueError(f"unknown part {part!r}")


def unexpected_tensor(path: str | os.PathLike, name: str, cfg: ModelConfig) -> ConversionError:
    """The error for an HF tensor that the LLaMA layout of `cfg` has no place for, with a hint
    (a bias, or a layer beyond config.json's num_hidden_layers)."""
    hint = (" (biases are not supported)" if name.endswith(".bias") else
            f" (config.json has num_hidden_layers={cfg.num_layers})"
            if name.startswith("model.layers.") else "")
    return ConversionError(f"{path}: unexpected tensor {name!r}{hint}")


def hf_weight_files(hf_dir: str | os.PathLike) -> list[Path]:
    """Weight files of an HF directory: safetensors preferred, then PyTorch .bin shards."""
    hf_dir = Path(hf_dir)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = hf_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ConversionError(f"{index}: not a weight index ({err})") from None
            files = [hf_dir / name for name in dict.fromkeys(weight_map.values())]
            for file in files:
                if not file.is_file():
                    raise ConversionError(f"{index} names {file.name}, which does not exist")
            return files
        if (hf_dir / single).is_file():
            return [hf_dir / single]
    raise ConversionError(f"{hf_dir}: no model.safetensors(.index.json) or "
                          "pytorch_model.bin(.index.json)")


def iter_hf_tensors(files: list[Path]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, tensor) one tensor at a time; only that tensor is materialised."""
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield file, name, handle.get_tensor(name)
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                state = torch.load(file, map_location="cpu", weights_only=True)
            for name in list(state):
                yield file, name, state.pop(name)
            del state


def count_hf_tensors(files: list[Path]) -> int | None:
    """Number of tensors (for the progress bar); None when it would need reading .bin files."""
    total = 0
    for file in files:
        if file.suffix != ".safetensors":
            return None
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            total += len(list(handle.keys()))
    return total


def load_hf_weights(model: Any, files: list[Path], cfg: ModelConfig, *,
                    progress: bool = False) -> None:
    """Copy HF tensors into a TP1/PP1 GPTModel built from `cfg`, streaming.

    Padded vocabulary rows are zeroed. Every HF tensor must be expected and of the expected
    shape, and none may be missing; errors name the file and key. With tied embeddings a stored
    `lm_head.weight` must equal `model.embed_tokens.weight`.
    """
    from tqdm import tqdm

    from megatron_longctx.checkpoint.model_io import canonical_parameters

    params = canonical_parameters(model)
    mapping, shapes = tensor_map(cfg), hf_shapes(cfg)
    for name, _ in mapping.values():
        if name not in params:
            raise ConversionError(f"model has no tensor {name!r}; build it at TP1/PP1 from the "
                                  "same ModelConfig")
    seen: set[str] = set()
    cast: set[torch.dtype] = set()
    tied_head: tuple[Path, torch.Tensor] | None = None
    bar = tqdm(total=count_hf_tensors(files), desc="hf -> megatron", unit="tensor",
               disable=not progress)
    with torch.no_grad():
        for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if key in params:
                params[key][cfg.vocab_size:].zero_()
        for file, name, tensor in iter_hf_tensors(files):
            bar.update(1)
            if _IGNORED_HF.fullmatch(name):
                continue
            if name == "lm_head.weight" and not cfg.untie_embeddings_and_output_weights:
                tied_head = (file, tensor)
                continue
            if name not in mapping:
                raise unexpected_tensor(file, name, cfg)
            if name in seen:
                raise ConversionError(f"{file}: tensor {name!r} appears twice")
            if tuple(tensor.shape) != shapes[name]:
                raise ConversionError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                      f"config.json implies {shapes[name]}")
            target, part = mapping[name]
            region = megatron_region(params[target], part, cfg)
            if tensor.dtype != region.dtype:
                cast.add(tensor.dtype)
            region.copy_(tensor.reshape(region.shape))
            seen.add(name)
    bar.close()
    if cast:
        warnings.warn(f"HF tensors stored as {sorted(map(str, cast))} were cast to "
                      f"{next(iter(params.values())).dtype} (config.json's dtype or "
                      "--params-dtype)", stacklevel=2)
    missing = [name for name in mapping if name not in seen]
    if missing:
        raise ConversionError(f"{files[0].parent}: {len(missing)} tensors missing, e.g. "
                              f"{missing[:5]}")
    if tied_head is not None:
        embedding = params["embedding.word_embeddings.weight"][: cfg.vocab_size]
        if not torch.equal(tied_head[1].to(embedding.dtype), embedding):
            raise ConversionError(f"{tied_head[0]}: lm_head.weight differs from "
                                  "model.embed_tokens.weight but config.json has "
                                  "tie_word_embeddings=true")


def iter_hf_state(model: Any, cfg: ModelConfig,
                  dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) from a TP1/PP1 GPTModel, one new contiguous tensor at a time."""
    from megatron_longctx.checkpoint.model_io import canonical_parameters

    params = canonical_parameters(model)
    shapes = hf_shapes(cfg)
    with torch.no_grad():
        for name, (target, part) in tensor_map(cfg).items():
            region = megatron_region(params[target].detach(), part, cfg)
            yield name, region.to(dtype=dtype, copy=True).contiguous().reshape(shapes[name])


def parse_size(text: str | int) -> int:
    """'5GB' (10^9), '500MiB' (2^20), '1000' -> bytes (HF's max_shard_size spelling)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB, 2GiB or bytes")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(match.group(1)) * scale)


def plan_shards(cfg: ModelConfig, dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """HF names grouped into consecutive shards of at most `max_shard_bytes` (a larger tensor
    gets a shard of its own), as save_pretrained does."""
    size = torch.tensor([], dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in hf_shapes(cfg).items():
        nbytes = size * int(torch.Size(shape).numel())
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_hf_weights(model: Any, cfg: ModelConfig, out_dir: Path, dtype: torch.dtype,
                     max_shard_bytes: int, *, progress: bool = False) -> list[str]:
    """Write safetensors shards (+ model.safetensors.index.json when more than one).

    Returns:
        The file names written.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    shards = plan_shards(cfg, dtype, max_shard_bytes)
    n = len(shards)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    shard_of = {name: i for i, shard in enumerate(shards) for name in shard}
    weight_map: dict[str, str] = {}
    total = 0
    current: dict[str, torch.Tensor] = {}
    current_index = 0
    bar = tqdm(total=len(shard_of), desc="megatron -> hf", unit="tensor", disable=not progress)

    def flush() -> None:
        path = out_dir / names[current_index]
        save_file(current, str(path), metadata={"format": "pt"})
        # safetensors 0.8 creates its files mode 0600 (unreadable for the group that shares
        # the model); give them the mode the umask gives any other new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)
        current.clear()

    for name, tensor in iter_hf_state(model, cfg, dtype):
        if shard_of[name] != current_index:
            flush()
            current_index = shard_of[name]
        current[name] = tensor
        weight_map[name] = names[current_index]
        total += tensor.numel() * tensor.element_size()
        bar.update(1)
    flush()
    bar.close()
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        names.append("model.safetensors.index.json")
    return names


def copy_tokenizer_files(src: str | os.PathLike, dst: Path) -> list[str]:
    """Copy the tokenizer files (and generation_config.json) present in `src` into `dst`."""
    src = Path(src)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# ----------------------------------------------------------------------------------------------
# conversions
# ----------------------------------------------------------------------------------------------
def _prepare_output(save_dir: Path) -> Path:
    """A temporary sibling of `save_dir` (renamed onto it by `_publish`)."""
    if save_dir.exists() and (not save_dir.is_dir() or any(save_dir.iterdir())):
        raise ConversionError(f"{save_dir}: exists and is not an empty directory")
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = save_dir.parent / f".{save_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, save_dir: Path) -> None:
    if save_dir.exists():
        save_dir.rmdir()  # empty (checked before the work started)
    os.rename(tmp, save_dir)


def build_conversion_model(cfg: ModelConfig, dtype: str, padded_vocab: int | None = None) -> Any:
    """A TP1/PP1 GPTModel on CPU, uninitialised (weights are about to be overwritten).

    `padded_vocab` builds the embedding/output with that many rows (the padding of the TP the
    checkpoint is meant for); None pads for TP1. Needs megatron's parallel state
    (`single_process_group`).
    """
    from megatron_longctx.model.build import build_model

    build_cfg = cfg if padded_vocab is None else dataclasses.replace(
        cfg, vocab_size=padded_vocab, pad_vocab=False)
    return build_model(build_cfg, ParallelConfig(), PrecisionConfig(params_dtype=dtype),
                       perform_initialization=False, use_cpu_initialization=True, device="cpu")


def convert_hf_to_megatron(
    hf_dir: str | os.PathLike,
    save_dir: str | os.PathLike,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    params_dtype: str | None = None,
    progress: bool = False,
) -> Path:
    """Convert an HF LLaMA directory into a checkpoint root of ours (iteration 0, model only).

    The conversion runs in this process at TP1/PP1; the result loads at any TP/PP
    (`load_model_checkpoint`). The TP/PP sizes given are checked against the architecture
    (heads, groups, FFN and layers divisible) and recorded as `converted_for`; TP also sets the
    vocabulary padding, so a run at that TP loads without re-padding.

    Args:
        hf_dir: directory with config.json and model.safetensors / shards / .bin files.
        save_dir: new (or empty) directory; written atomically (temp dir, rename at the end).
        tensor_model_parallel_size: TP the checkpoint is meant for.
        pipeline_model_parallel_size: PP the checkpoint is meant for.
        params_dtype: fp32 | bf16 | fp16; default config.json's dtype.
        progress: show a tqdm bar.

    Returns:
        `save_dir`.
    """
    from megatron_longctx.checkpoint.model_io import save_model_checkpoint, single_process_group
    from megatron_longctx.config.model import validate_all

    hf_dir, save_dir = Path(hf_dir), Path(save_dir)
    hf = read_hf_config(hf_dir)
    cfg = model_config_from_hf(hf, where=str(hf_dir / "config.json"))
    files = hf_weight_files(hf_dir)
    target = ParallelConfig(tensor_model_parallel_size=tensor_model_parallel_size,
                            pipeline_model_parallel_size=pipeline_model_parallel_size)
    try:
        validate_all(cfg, target)
    except ValueError as err:
        raise ConversionError(f"{hf_dir}: {err}") from None
    dtype = params_dtype or hf_params_dtype(hf)
    if dtype not in PARAMS_DTYPES:
        raise ConversionError(f"params dtype {dtype!r}: one of {sorted(PARAMS_DTYPES)}")
    tmp = _prepare_output(save_dir)
    try:
        tokenizer = None
        if copy_tokenizer_files(hf_dir, tmp / "tokenizer"):
            tokenizer = {"type": "HuggingFaceTokenizer",
                         "model": str(save_dir.resolve() / "tokenizer")}
        with single_process_group():
            model = build_conversion_model(
                cfg, dtype, padded_vocab_size(cfg.vocab_size, tensor_model_parallel_size,
                                              cfg.make_vocab_size_divisible_by))
            load_hf_weights(model, files, cfg, progress=progress)
            _say(progress, f"saving the distributed checkpoint into {save_dir}")
            save_model_checkpoint(
                [model], tmp, 0, cfg, ParallelConfig(), CONVERT_SOURCE, tokenizer,
                extra_meta={"hf_config": hf, "converted_from": str(hf_dir.resolve()),
                            "converted_for": {
                                "tensor_model_parallel_size": tensor_model_parallel_size,
                                "pipeline_model_parallel_size": pipeline_model_parallel_size}})
            del model
        _publish(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return save_dir


def _our_checkpoint(load_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(iteration directory, metadata) of a checkpoint of ours, or ConversionError."""
    from megatron_longctx.checkpoint.meta import read_meta, resolve_checkpoint

    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        raise ConversionError(f"{load_dir}: not a directory")
    try:
        directory = resolve_checkpoint(load_dir)
    except (FileNotFoundError, ValueError) as err:
        raise ConversionError(str(err)) from None
    if directory is None:
        raise ConversionError(f"{load_dir}: no megatron-longctx checkpoint (no "
                              "longctx_meta.json or latest_checkpointed_iteration.txt)")
    try:
        return directory, read_meta(directory)
    except ValueError as err:
        raise ConversionError(str(err)) from None


def _tokenizer_source(tokenizer_dir: str | os.PathLike | None, directory: Path,
                      meta: dict[str, Any]) -> str | os.PathLike | None:
    """The given --tokenizer-dir (checked), else the checkpoint's recorded tokenizer
    directory, else ROOT/tokenizer next to the iteration (a moved root), else None."""
    if tokenizer_dir is not None:
        if not Path(tokenizer_dir).is_dir():
            raise ConversionError(f"--tokenizer-dir {tokenizer_dir}: not a directory")
        return tokenizer_dir
    recorded = (meta.get("tokenizer") or {}).get("model")
    for candidate in (recorded, directory.parent / "tokenizer"):
        if candidate and Path(candidate).is_dir():
            return candidate
    return None


def convert_megatron_to_hf(
    load_dir: str | os.PathLike,
    save_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_size: str | int = "5GB",
    dtype: str | None = None,
    progress: bool = False,
) -> Path:
    """Convert a checkpoint of ours (any saved TP/PP; model weights only) into an HF directory.

    Writes config.json (from the checkpoint's ModelConfig, on top of the HF config it was
    converted from when known), model.safetensors or shards + index, and the tokenizer files
    from `tokenizer_dir` (default: the checkpoint's recorded tokenizer directory, if any).

    Args:
        load_dir: checkpoint root (latest marker) or iteration directory.
        save_dir: new (or empty) directory; written atomically.
        tokenizer_dir: where to copy tokenizer files from.
        max_shard_size: e.g. "5GB", "500MB", or bytes.
        dtype: fp32 | bf16 | fp16 for the output; default the checkpoint's.
        progress: show a tqdm bar.

    Returns:
        `save_dir`.
    """
    from megatron_longctx.checkpoint.model_io import (
        checkpoint_params_dtype,
        load_model_checkpoint,
        single_process_group,
    )

    save_dir = Path(save_dir)
    directory, meta = _our_checkpoint(load_dir)
    cfg = ModelConfig(**meta["model"])
    saved_dtype = checkpoint_params_dtype(directory)
    out_dtype = dtype or saved_dtype
    if out_dtype not in PARAMS_DTYPES:
        raise ConversionError(f"dtype {out_dtype!r}: one of {sorted(PARAMS_DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    tokenizer_dir = _tokenizer_source(tokenizer_dir, directory, meta)
    hf = hf_config_from_model(cfg, out_dtype, meta.get("hf_config"))
    tmp = _prepare_output(save_dir)
    try:
        with single_process_group():
            model = build_conversion_model(cfg, saved_dtype)
            _say(progress, f"loading {directory}")
            load_model_checkpoint([model], directory)
            write_hf_weights(model, cfg, tmp, torch_dtype(out_dtype), max_bytes,
                             progress=progress)
            del model
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        _publish(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return save_dir
