"""Every RoPE scheme at TP2 and CP2 (2 gloo ranks) against HF transformers: logits of a
converted random LLaMA below and above the original length, and at TP2 the KV-cache decode
across it. CP2 checks that the rotary table is global (each rank rotates its two chunks with
their global positions, and length-dependent schemes see the global length)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_longctx.config.model import ModelConfig, ParallelConfig
from tests.distributed.spawn import run_distributed
from tests.unit.test_convert import VOCAB
from tests.unit.test_rotary import ABOVE, BELOW, SCHEMES, _hf_cached_decode, _hf_model_dir

PREFILL, DECODE = 20, 44


def _forward(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits (TP shards gathered) [b, s, padded vocab]."""
    return model(ids, positions, None, runtime_gather_output=True)


def _tp2_and_cp2(rank: int, world: int, ckpt: str, full: list[torch.Tensor],
                 decode: torch.Tensor) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_longctx.checkpoint.meta import read_meta, resolve_checkpoint
    from megatron_longctx.checkpoint.model_io import load_model_checkpoint
    from megatron_longctx.model.build import build_model
    from megatron_longctx.parallel.context_parallel import cp_chunk_ids, split_for_cp
    from megatron_longctx.parallel.init import initialize_model_parallel

    cfg = ModelConfig(**read_meta(resolve_checkpoint(ckpt))["model"])
    out: dict = {}
    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    initialize_model_parallel(tp2)
    with torch.no_grad():
        model = build_model(cfg, tp2, perform_initialization=False).eval()
        load_model_checkpoint([model], ckpt)
        out["tp2"] = [_forward(model, ids, torch.arange(ids.shape[1])[None])[..., :VOCAB]
                      for ids in full]
        context = StaticInferenceContext(max_batch_size=1, max_sequence_length=decode.shape[1])
        rows = []
        for a, b in [(0, PREFILL)] + [(i, i + 1) for i in range(PREFILL, decode.shape[1])]:
            logits = model(decode[:, a:b], torch.arange(a, b)[None], None,
                           inference_context=context, runtime_gather_output=True)
            context.increment_sequence_len_offset(b - a)
            rows.append(logits[0, -1, :VOCAB])
        out["tp2_decode"] = torch.stack(rows)

    cp2 = ParallelConfig(context_parallel_size=2)
    initialize_model_parallel(cp2)
    cp_rank = parallel_state.get_context_parallel_rank()
    with torch.no_grad():
        model = build_model(cfg, cp2, perform_initialization=False).eval()
        load_model_checkpoint([model], ckpt)
        out["cp2"] = []
        for ids in full:
            n = ids.shape[1]
            positions = split_for_cp(torch.arange(n)[None], 2, cp_rank)
            local = _forward(model, split_for_cp(ids, 2, cp_rank), positions)[..., :VOCAB]
            parts = [torch.empty_like(local) for _ in range(2)]
            dist.all_gather(parts, local.contiguous(),
                            group=parallel_state.get_context_parallel_group())
            chunk = n // 4
            logits = torch.empty(1, n, VOCAB)
            for r, part in enumerate(parts):
                for slot, c in enumerate(cp_chunk_ids(2, r)):
                    logits[:, c * chunk:(c + 1) * chunk] = part[:, slot * chunk:
                                                                (slot + 1) * chunk]
            out["cp2"].append(logits)
    return out


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_scheme_at_tp2_and_cp2_matches_hf(tmp_path: Path, scheme: str) -> None:
    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron

    hf = _hf_model_dir(tmp_path / "hf", scheme, "v5")
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg")
    gen = torch.Generator().manual_seed(5)
    full = [torch.randint(0, VOCAB, (1, n), generator=gen) for n in (BELOW, ABOVE)]
    decode = torch.randint(0, VOCAB, (1, DECODE), generator=gen)
    with torch.no_grad():
        expected = [hf(ids).logits for ids in full]
    expected_decode = _hf_cached_decode(hf, decode, PREFILL)
    rank0, rank1 = run_distributed(_tp2_and_cp2, 2, str(tmp_path / "meg"), full, decode)
    assert all(torch.equal(a, b) for a, b in zip(rank0["tp2"], rank1["tp2"]))
    diffs = {
        "tp2": max(float((a - b).abs().max()) for a, b in zip(rank0["tp2"], expected)),
        "tp2_decode": float((rank0["tp2_decode"] - expected_decode).abs().max()),
        "cp2": max(float((a - b).abs().max()) for a, b in zip(rank0["cp2"], expected)),
    }
    print(f"{scheme}: max |logit diff| {diffs}")
    assert max(diffs.values()) < 1e-5, diffs
