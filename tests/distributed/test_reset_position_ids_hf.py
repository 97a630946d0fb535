"""`--reset-position-ids` against HF transformers: a THD micro-batch with positions restarting
per document gives, for every document, the logits HF LlamaForCausalLM gives that document run
alone (within 1e-5), at TP1, CP2 and in KV-cached decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed.spawn import run_distributed
from tests.unit.test_eval_needle import make_tiny_hf

torch.set_num_threads(1)

SEQ = 48
STARTS = [0, 1, 5, 9, 20, 33]  # lengths 1, 4, 4, 11, 13 and 15 (the last crosses the row end)


@pytest.fixture(scope="module")
def models(tmp_path_factory, hf_tokenizer_dir) -> tuple[Path, Path]:
    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("reset-pos")
    hf = make_tiny_hf(root / "hf", hf_tokenizer_dir, seed=4)
    return hf, convert_hf_to_megatron(hf, root / "ours")


def _row(vocab: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(3).integers(3, vocab, size=SEQ))


def _ours(rank: int, world: int, path: str, cp: int, vocab: int) -> dict | None:
    from megatron.core import parallel_state as ps

    from megatron_longctx.eval.models import load_causal_lm
    from megatron_longctx.parallel.thd import thd_partition_indices
    from megatron_longctx.training.data import build_thd_microbatch

    lm = load_causal_lm(path, context_parallel_size=cp)
    tokens = _row(vocab)
    segment = torch.zeros(SEQ, dtype=torch.long)
    for s in STARTS[1:]:
        segment[s:] += 1
    batch = {"tokens": tokens[None], "labels": tokens[None], "loss_mask": torch.ones(1, SEQ),
             "segment_ids": segment[None]}
    cp_rank = ps.get_context_parallel_rank() if cp > 1 else 0
    mb = build_thd_microbatch(batch, cp_size=cp, cp_rank=cp_rank, seq_length=SEQ, eod=0,
                              reset_position_ids=True, pad_multiple=4)
    with torch.inference_mode():
        logits = lm.model(mb["tokens"], mb["position_ids"], None,
                          packed_seq_params=mb["packed_seq_params"])[0].float()
    cu = mb["packed_seq_params"].cu_seqlens_q
    local = thd_partition_indices(cu, cp, cp_rank)
    out = {"slots": local, "logits": logits[:, :vocab], "cu": cu.tolist()}
    decode = None
    if cp == 1:  # KV cache: prefill one token, then decode the 13-token document token by token
        doc = tokens[STARTS[4]:STARTS[5]].tolist()
        state = lm._new_state(len(doc))
        steps = [lm._extend(state, doc[:1], 0)[:vocab]]
        for i, tok in enumerate(doc[1:], start=1):
            steps.append(lm._step(state, tok, i)[:vocab])
        decode = torch.stack(steps)
    out["decode"] = decode
    if lm.is_driver:
        lm.close()
    else:
        lm.serve()
        lm.close()
    return out


def _hf_alone(hf_dir: Path, doc: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([doc])).logits[0].float()


@pytest.mark.parametrize("cp", [1, 2], ids=["tp1", "cp2"])
def test_reset_positions_equal_hf_per_document(models, cp: int) -> None:
    hf_dir, ours_dir = models
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(hf_dir).vocab_size
    results = run_distributed(_ours, cp, str(ours_dir), cp, vocab)
    tokens = _row(vocab)
    total = results[0]["cu"][-1]
    row = torch.full((total, vocab), float("nan"))
    for r in results:
        row[r["slots"]] = r["logits"]
    from megatron_longctx.parallel.thd import pack_row

    packed = pack_row(STARTS, SEQ, 4)
    checked = 0
    for a, e in zip(packed.cu_seqlens[:-1], packed.cu_seqlens[1:]):
        src = packed.index[a:e]
        src = src[src >= 0]
        want = _hf_alone(hf_dir, tokens[src].tolist())
        got = row[a:a + len(src)]
        assert (got - want).abs().max() < 1e-5, (a, (got - want).abs().max())
        checked += len(src)
    assert checked == SEQ - packed.dropped_tokens
    if cp == 1:
        doc = tokens[STARTS[4]:STARTS[5]].tolist()
        want = _hf_alone(hf_dir, doc)
        assert (results[0]["decode"] - want).abs().max() < 1e-5
