"""Strict checks of a Hugging Face model directory, shared by the converter and evaluation.

`transformers.from_pretrained` fills a tensor the files lack with random weights and loads a
directory of any architecture it knows (a `model_type: gpt2` directory evaluated a randomly
initialised GPT-2: needle 0, exit 0; a checkpoint missing one MLP tensor scored 75 instead of
100), and a truncated safetensors file fails inside the Rust reader without a file name. The
converter already refused the first two; `check_hf_dir` gives every consumer the same checks,
reading only config.json and the weight files' headers (no tensor data):

* config.json: JSON object, a `model_type` the converter knows (`MODEL_TYPES`: llama, and
  mistral / qwen2 without a sliding window) with its own class in `architectures`, the shape
  fields the converter needs (hidden size, heads, layers, FFN width; no LLaMA attention/MLP
  biases; Qwen2's Q/K/V biases are its layout).
* Weight files (`hf_weight_files`: safetensors preferred, index or single file, .bin
  otherwise): every safetensors header parses and the file holds the byte ranges it
  declares (a truncated file is named with both sizes); .bin files are opened memory-mapped.
* Tensors: exactly the converter's `tensor_map` names (a tied `lm_head.weight` and the
  rotary `inv_freq` buffers some old checkpoints carry are allowed), each once, with the
  shapes config.json implies.

RoPE settings are not checked here: the HF backend evaluates every RoPE variant transformers
implements (dynamic NTK, YaRN, ...); only the converter needs megatron-core's subset.

Errors are `ConversionError` (a ValueError): one line naming the directory or file and the
tensor, e.g. `/models/hf: missing tensor model.layers.0.mlp.up_proj.weight (1 tensors missing,
...)`; the messages are the converter's own (`load_hf_weights`), which checks the same while
copying.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from megatron_longctx.config.model import ModelConfig
from megatron_longctx.convert.hf_llama import (
    ConversionError,
    hf_rope_source,
    hf_shapes,
    hf_weight_files,
    model_config_from_hf,
    read_hf_config,
    unexpected_tensor,
)

# Buffers some older HF checkpoints saved; recomputed from the config by every loader.
ROTARY_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_ROPE_KEYS = ("rope_scaling", "rope_parameters", "partial_rotary_factor")
# The largest safetensors header the format allows (100 MB, as the reference reader).
_MAX_HEADER = 100_000_000


def architecture_config(hf: dict[str, Any], where: str) -> ModelConfig:
    """The converter's ModelConfig for `hf` without its RoPE restrictions (shapes only).

    Raises:
        ConversionError: another model type or architecture, a missing shape field, biases.
    """
    plain = {key: value for key, value in hf.items() if key not in _ROPE_KEYS}
    plain["rope_theta"], _ = hf_rope_source(hf, where)  # transformers' precedence; finite
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):
        raise ConversionError(f"{where}: architectures must be a list, found {archs!r}")
    return model_config_from_hf(plain, where=where)


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor entries of a safetensors file's header, after checking the file holds them.

    Raises:
        ConversionError: unreadable, not safetensors, or truncated (both sizes named).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: truncated ({size} bytes; not a safetensors "
                                      "file)")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER or 8 + length > size:
                raise ConversionError(f"{path}: truncated or not safetensors (header of "
                                      f"{length} bytes, file of {size})")
            header = json.loads(handle.read(length))
    except OSError as err:
        raise ConversionError(f"{path}: cannot be read ({err.strerror or err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not an object)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (KeyError, TypeError, IndexError, ValueError):
        raise ConversionError(f"{path}: corrupt safetensors header (bad data_offsets)") \
            from None
    if 8 + length + end > size:
        raise ConversionError(f"{path}: truncated: {size} bytes, its header needs "
                              f"{8 + length + end}")
    return tensors


def _bin_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch.load fails in many ways on bad bytes)
        raise ConversionError(f"{path}: truncated or corrupt ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0][:200] if str(err) else ''})"
                              ) from None
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: not a state dict")
    return {name: tuple(t.shape) for name, t in state.items() if hasattr(t, "shape")}


def file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of one weight file, without reading tensor data."""
    if path.suffix == ".safetensors":
        return {name: tuple(entry.get("shape", ())) for name, entry in
                safetensors_header(path).items()}
    return _bin_shapes(path)


def check_hf_tensors(hf_dir: Path, files: list[Path], cfg: ModelConfig) -> None:
    """Exactly the expected tensors, once each, with the expected shapes.

    Raises:
        ConversionError: naming the file (unexpected, duplicate, wrong shape) or the directory
            (missing) and the tensor.
    """
    expected = hf_shapes(cfg)
    seen: set[str] = set()
    for path in files:
        for name, shape in file_shapes(path).items():
            if ROTARY_BUFFER.fullmatch(name):
                continue
            if name == "lm_head.weight" and not cfg.untie_embeddings_and_output_weights:
                continue  # tied: must equal the embedding (the converter compares values)
            if name not in expected:
                raise unexpected_tensor(path, name, cfg)
            if name in seen:
                raise ConversionError(f"{path}: tensor {name!r} appears twice")
            if shape != expected[name]:
                raise ConversionError(f"{path}: tensor {name!r} has shape {shape}, config.json "
                                      f"implies {expected[name]}")
            seen.add(name)
    missing = [name for name in expected if name not in seen]
    if missing:
        raise ConversionError(f"{hf_dir}: missing tensor {missing[0]} ({len(missing)} tensors "
                              f"missing, e.g. {missing[:5]})")


def check_hf_dir(hf_dir: str | os.PathLike) -> ModelConfig:
    """Check a Hugging Face LLaMA directory strictly (module docstring); returns its shape.

    Raises:
        ConversionError: one line naming the directory or file, and the tensor or field.
    """
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    cfg = architecture_config(hf, str(hf_dir / "config.json"))
    check_hf_tensors(hf_dir, hf_weight_files(hf_dir), cfg)
    return cfg


def check_loading_info(hf_dir: str | os.PathLike, info: dict[str, Any]) -> None:
    """Refuse what transformers itself reports from `from_pretrained(...,
    output_loading_info=True)`: missing, unexpected or mismatched keys (a second line of
    defence behind `check_hf_dir`)."""
    for key, what in (("missing_keys", "missing tensor"),
                      ("unexpected_keys", "unexpected tensor"),
                      ("mismatched_keys", "tensor of the wrong shape")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        names = [n for n in names if not ROTARY_BUFFER.fullmatch(n)]
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise ConversionError(f"{hf_dir}: {what} {names[0]}{more} (transformers)")
