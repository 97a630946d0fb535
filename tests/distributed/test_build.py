"""Model builder: RoPE options reach GPTModel, PP/VPP stages get the right layers and ends."""

from __future__ import annotations

from dataclasses import replace

import torch

from megatron_longctx.config.model import ParallelConfig
from megatron_longctx.model.presets import get_preset
from tests.distributed.spawn import run_distributed


def _rope(rank: int, world: int) -> dict:
    from megatron_longctx.model.build import build_model
    from megatron_longctx.model.norm import RMSNorm
    from megatron_longctx.parallel.init import initialize_model_parallel, set_seed

    initialize_model_parallel(ParallelConfig())
    set_seed(1)
    out = {}
    for name, changes in {"base": {"rotary_base": 500000},
                          "llama31": {"rotary_base": 500000, "rope_scaling": True,
                                      "rope_scaling_factor": 8.0}}.items():
        model = build_model(replace(get_preset("tiny"), **changes), ParallelConfig())
        out[name] = model.rotary_pos_emb.inv_freq.clone()
        out["final_norm"] = type(model.decoder.final_layernorm) is RMSNorm
    return out


def test_rope_options_reach_gpt_model() -> None:
    out = run_distributed(_rope, 1)[0]
    head_dim = 16
    expected = 1.0 / 500000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    assert torch.allclose(out["base"], expected)
    assert not torch.allclose(out["llama31"], expected)  # low frequencies scaled down
    assert torch.allclose(out["llama31"][0], expected[0])  # high frequencies kept
    assert out["final_norm"]


def _stages(rank: int, world: int) -> list[tuple[bool, bool, int]]:
    from megatron_longctx.model.build import build_model_chunks
    from megatron_longctx.parallel.init import initialize_model_parallel, set_seed

    parallel = ParallelConfig(pipeline_model_parallel_size=2,
                              virtual_pipeline_model_parallel_size=2)
    initialize_model_parallel(parallel)
    set_seed(1)
    chunks = build_model_chunks(replace(get_preset("tiny"), num_layers=8), parallel)
    return [(c.pre_process, c.post_process, len(c.decoder.layers)) for c in chunks]


def test_pipeline_virtual_stages() -> None:
    rank0, rank1 = run_distributed(_stages, 2)
    assert rank0 == [(True, False, 2), (False, False, 2)]
    assert rank1 == [(False, False, 2), (False, True, 2)]
