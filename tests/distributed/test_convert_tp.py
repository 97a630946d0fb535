"""A converted checkpoint (saved at TP1, vocabulary padded to 384) loads at TP2 (padded to 512)
with HF's logits and at PP2 with HF's tensors; a TP2 save of it converts back to the original
HF tensors bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_longctx.config.model import ModelConfig, ParallelConfig
from tests.distributed.spawn import run_distributed
from tests.unit.test_convert import VOCAB, make_hf, read_hf_tensors


def _load_at_tp2_and_pp2(rank: int, world: int, ckpt: str, ids: torch.Tensor,
                         out_root: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_longctx.checkpoint.meta import read_meta, resolve_checkpoint
    from megatron_longctx.checkpoint.model_io import (
        canonical_parameters,
        load_model_checkpoint,
        save_model_checkpoint,
    )
    from megatron_longctx.model.build import build_model
    from megatron_longctx.parallel.init import initialize_model_parallel, set_seed

    cfg = ModelConfig(**read_meta(resolve_checkpoint(ckpt))["model"])
    result = {}
    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    initialize_model_parallel(tp2)
    set_seed(7)
    model = build_model(cfg, tp2).eval()
    load_model_checkpoint([model], ckpt)
    with torch.no_grad():
        local = model(ids, torch.arange(ids.shape[1]).expand_as(ids), attention_mask=None)
    parts = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(parts, local.contiguous(),
                    group=parallel_state.get_tensor_model_parallel_group())
    result["logits"] = torch.cat(parts, dim=-1)
    save_model_checkpoint([model], out_root, 7, cfg, tp2, "test_convert_tp")

    pp2 = ParallelConfig(pipeline_model_parallel_size=2)
    initialize_model_parallel(pp2)
    set_seed(7)
    model = build_model(cfg, pp2)
    load_model_checkpoint([model], ckpt)
    result["params"] = {k: v.detach().clone() for k, v in canonical_parameters(model).items()}
    return result


def test_tp2_logits_pp2_tensors_and_tp2_save_back_to_hf(tmp_path: Path) -> None:
    from megatron_longctx.convert.hf_llama import (
        convert_hf_to_megatron,
        convert_megatron_to_hf,
        hf_shapes,
        megatron_region,
        model_config_from_hf,
        read_hf_config,
        tensor_map,
    )

    hf = make_hf(tmp_path / "hf", max_shard_size="40KB")
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    rank0, rank1 = run_distributed(_load_at_tp2_and_pp2, 2, str(tmp_path / "meg"), ids,
                                   str(tmp_path / "tp2"))

    with torch.no_grad():
        expected = hf(ids).logits
    assert rank0["logits"].shape == (2, 16, 512)  # TP2 pads 300 -> 512
    assert torch.equal(rank0["logits"], rank1["logits"])
    assert (rank0["logits"][..., :VOCAB] - expected).abs().max() < 1e-4

    # PP2: rank 0 holds the embedding and layer 0, rank 1 layer 1, final norm, output layer.
    assert "decoder.layers.1.mlp.linear_fc2.weight" not in rank0["params"]
    assert "embedding.word_embeddings.weight" not in rank1["params"]
    params = {**rank0["params"], **rank1["params"]}
    cfg = model_config_from_hf(read_hf_config(tmp_path / "hf"))
    original = read_hf_tensors(tmp_path / "hf")
    shapes = hf_shapes(cfg)
    for name, (target, part) in tensor_map(cfg).items():
        got = megatron_region(params[target], part, cfg).reshape(shapes[name])
        assert torch.equal(got, original[name]), name

    # A checkpoint saved by 2 TP ranks (512 vocabulary rows) exports to the original tensors.
    convert_megatron_to_hf(tmp_path / "tp2", tmp_path / "back")
    back = read_hf_tensors(tmp_path / "back")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(original[k], back[k]) for k in original)
