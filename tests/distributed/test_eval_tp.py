"""Evaluation models: KV-cache attention is bottom-right causal, cached greedy generation equals
the full-recompute greedy reference (Megatron with chunked prefill, HF), both backends agree on
the same weights, and TP2 / CP2 (2 gloo ranks, driver + serving rank) equal one process."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_longctx.config.model import ParallelConfig
from megatron_longctx.config.presets import get_preset
from tests.distributed.spawn import run_distributed
from tests.unit.test_eval_needle import make_tiny_hf

torch.set_num_threads(1)
PROMPT = [int(x) for x in np.random.default_rng(5).integers(3, 700, size=45)]


@pytest.fixture(scope="module")
def models(tmp_path_factory, hf_tokenizer_dir) -> tuple[Path, Path]:
    """A tiny random HF model and the same weights converted to our format."""
    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("eval-models")
    hf = make_tiny_hf(root / "hf", hf_tokenizer_dir, seed=2)
    return hf, convert_hf_to_megatron(hf, root / "ours")


@pytest.mark.parametrize("sq", [1, 5])
@pytest.mark.parametrize("mask", ["causal", "no_mask"])
def test_cached_step_attention_is_bottom_right_causal(sq: int, mask: str) -> None:
    """sq new queries against sk = 12 keys (the last sq are the queries' own positions), as in
    a KV-cache step; megatron passes no_mask there, a causal module must still mask."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_longctx.model.attention import SDPACoreAttention
    from megatron_longctx.model.build import build_transformer_config

    config = build_transformer_config(replace(get_preset("tiny"), seq_length=32),
                                      ParallelConfig())
    core = SDPACoreAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal)
    core.eval()
    gen = torch.Generator().manual_seed(0)
    sk, heads, groups, d = 12, 4, 2, 16
    q = torch.randn(sq, 1, heads, d, generator=gen)
    k = torch.randn(sk, 1, groups, d, generator=gen)
    v = torch.randn(sk, 1, groups, d, generator=gen)
    out = core(q, k, v, None, attn_mask_type=getattr(AttnMaskType, mask))
    # reference: query i sits at position sk - sq + i and sees keys 0..sk - sq + i
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q.double(), kk.double()) / d**0.5
    allowed = torch.arange(sk)[None, :] <= (torch.arange(sq)[:, None] + sk - sq)
    ref = torch.einsum("bhqk,kbhd->qbhd",
                       scores.masked_fill(~allowed, float("-inf")).softmax(-1), vv.double())
    assert (out.double() - ref.reshape(sq, 1, heads * d)).abs().max() < 1e-5


def test_kv_cache_generation_equals_full_recompute(models) -> None:
    from megatron_longctx.eval.models import load_causal_lm

    hf_dir, ours_dir = models
    outputs = {}
    for name, path, chunks in (("hf", hf_dir, (0, 7)), ("ours", ours_dir, (0, 7, 16))):
        model = load_causal_lm(path)
        try:
            reference = model.generate(PROMPT, 30, stop_ids=[], use_cache=False)
            assert len(reference) == 30
            for chunk in chunks:  # whole-prompt prefill and chunked prefill
                model.prefill_chunk = chunk
                assert model.generate(PROMPT, 30, stop_ids=[]) == reference, (name, chunk)
            # stopping: ends before the stop id, which is not returned
            stop = reference[10]
            assert model.generate(PROMPT, 30, stop_ids=[stop]) == reference[
                :reference.index(stop)]
            outputs[name] = (reference, model.token_losses(PROMPT))
        finally:
            model.close()
    # same weights, same greedy tokens and (to float rounding) the same losses
    assert outputs["hf"][0] == outputs["ours"][0]
    assert np.abs(outputs["hf"][1] - outputs["ours"][1]).max() < 1e-4


def _parallel_eval(rank: int, world: int, path: str, tp: int, cp: int) -> dict | None:
    from megatron_longctx.eval.models import drive, load_causal_lm

    model = load_causal_lm(path, tensor_model_parallel_size=tp, context_parallel_size=cp,
                           prefill_chunk=16)

    def job(m) -> dict:
        out = {"losses": m.token_losses(PROMPT), "losses_odd": m.token_losses(PROMPT[:44])}
        if cp == 1:
            out["tokens"] = m.generate(PROMPT, 20, stop_ids=[])
        else:
            with pytest.raises(NotImplementedError, match="context-parallel"):
                m.generate(PROMPT, 20, stop_ids=[])
        return out

    return drive(model, job)


@pytest.mark.parametrize("tp,cp", [(2, 1), (1, 2)], ids=["tp2", "cp2"])
def test_model_parallel_matches_one_process(models, tp: int, cp: int) -> None:
    _, ours_dir = models
    (one,) = run_distributed(_parallel_eval, 1, str(ours_dir), 1, 1)
    driver, server = run_distributed(_parallel_eval, 2, str(ours_dir), tp, cp)
    assert server is None  # rank 1 only served the driver's calls
    for key in ("losses", "losses_odd"):
        assert driver[key].shape == one[key].shape
        assert np.abs(driver[key] - one[key]).max() < 1e-5
    if cp == 1:
        assert driver["tokens"] == one["tokens"]
