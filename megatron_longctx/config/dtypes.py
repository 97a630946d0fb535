"""The one map of parameter dtype names: ours (`fp32`/`bf16`/`fp16`, the flag values) to
torch's attribute names, which are also Hugging Face config.json's `torch_dtype`/`dtype` names.

Torch is imported only inside the two functions (config imports nothing heavy: a parser or a
`validate()` must not pay torch's ~1.5 s import).
"""

from __future__ import annotations

from typing import Any

#: our name -> torch / Hugging Face name.
DTYPE_NAMES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Hugging Face / torch name -> ours.
HF_DTYPE_NAMES: dict[str, str] = {hf: ours for ours, hf in DTYPE_NAMES.items()}
#: Our names, in flag order (fp32 default, --bf16, --fp16).
PARAMS_DTYPES: tuple[str, ...] = tuple(DTYPE_NAMES)


def torch_dtype(name: str) -> Any:
    """torch.float32 / torch.bfloat16 / torch.float16 for `fp32` / `bf16` / `fp16`."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"params dtype {name!r}: one of {PARAMS_DTYPES}")
    return getattr(torch, DTYPE_NAMES[name])


def dtype_name(dtype: Any) -> str:
    """`fp32` / `bf16` / `fp16` for a torch dtype (or its name, e.g. "bfloat16")."""
    text = str(dtype).removeprefix("torch.")
    if text not in HF_DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r}: one of {sorted(HF_DTYPE_NAMES)}")
    return HF_DTYPE_NAMES[text]
