"""RMSNorm for megatron's local spec that works with sequence parallelism.

megatron-core 0.16.1's local spec uses `WrappedTorchNorm`, which asserts
`not config.sequence_parallel`. The norm itself needs nothing special under SP (it is
per-token); what SP needs is that the weight's gradient, computed on a 1/TP slice of the
tokens, is summed over the TP group. Megatron does that in finalize_model_grads for every
parameter tagged `sequence_parallel=True` (as FusedLayerNorm/TENorm tag theirs), so this module
tags its weight the same way. Without the tag the weight would silently train on 1/TP of the
tokens and drift apart between TP ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back.

    The fp32 upcast costs one temporary of the input's size (for a [4096, 1, 4096] bf16
    activation: 64 MiB), and matches Hugging Face LLaMA's numerics, which matters when
    continuing pretraining from HF weights.

    Signature matches megatron's norm builders: (config, hidden_size, eps, ...).
    """

    def __init__(
        self,
        config: Any,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
        **_: Any,
    ) -> None:
        super().__init__()
        if getattr(config, "layernorm_zero_centered_gamma", False) or zero_centered_gamma:
            raise ValueError("RMSNorm here does not implement zero-centered gamma "
                             "(--apply-layernorm-1p)")
        self.eps = eps
        self.hidden_size = hidden_size
        dtype = getattr(config, "params_dtype", torch.float32)
        # Where megatron's own layers put their weights: the current CUDA device unless
        # --use-cpu-initialization (build_model then moves the whole model to its device).
        on_gpu = torch.cuda.is_available() and not getattr(config, "use_cpu_initialization",
                                                            True)
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else None
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.sequence_parallel = bool(getattr(config, "sequence_parallel", False))
        # finalize_model_grads all-reduces grads of params tagged like this over TP.
        self.weight.sequence_parallel = self.sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        out = F.rms_norm(x.float(), (self.hidden_size,), eps=self.eps)
        return (out * self.weight.float()).to(x.dtype)
