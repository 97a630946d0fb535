"""Prefix-reusing generation at TP2 (2 gloo ranks: driver + serving rank, each with its own
persistent KV cache shard): the RULER suite gives the responses, scores and reused-token counts
of one process, and the model API's reuse sequence (tests/unit/test_eval_models.py) gives the
tokens and reused counts of one process and of plain generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.spawn import run_distributed
from tests.unit.test_eval_models import reuse_sequence
from tests.unit.test_eval_needle import make_tiny_hf

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ours(tmp_path_factory, hf_tokenizer_dir) -> Path:
    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("ruler-tp")
    return convert_hf_to_megatron(make_tiny_hf(root / "hf", hf_tokenizer_dir, seed=6),
                                  root / "ours")


def _ruler(rank: int, world: int, path: str, out: str, tp: int) -> list | None:
    from megatron_longctx.eval.models import drive, load_causal_lm
    from megatron_longctx.eval.ruler import RulerSettings, run_ruler

    model = load_causal_lm(path, tensor_model_parallel_size=tp, prefill_chunk=256)
    settings = RulerSettings(tasks=["niah_single_1", "niah_multikey_2"], lengths=[1024],
                             num_samples=2, max_new_tokens=6)

    def job(m) -> list:
        results = run_ruler(m, settings, out, log=None, progress=False, plot=False)
        return [(c["task"], s["index"], s["response"], s["score"], s["reused_tokens"])
                for c in results["cells"] for s in c["samples"]]

    return drive(model, job)


def test_ruler_tp2_equals_tp1(ours, tmp_path) -> None:
    (one,) = run_distributed(_ruler, 1, str(ours), str(tmp_path / "tp1"), 1)
    driver, server = run_distributed(_ruler, 2, str(ours), str(tmp_path / "tp2"), 2)
    assert server is None and len(one) == 4
    assert driver == one
    assert sum(r[4] for r in one) > 0  # the cache was reused


def _sequence(rank: int, world: int, path: str, tp: int) -> list | None:
    from megatron_longctx.eval.models import drive, load_causal_lm

    model = load_causal_lm(path, tensor_model_parallel_size=tp, prefill_chunk=256)
    return drive(model, reuse_sequence)


def test_reuse_sequence_tp2_equals_tp1_and_plain(ours) -> None:
    (one,) = run_distributed(_sequence, 1, str(ours), 1)
    driver, server = run_distributed(_sequence, 2, str(ours), 2)
    assert server is None
    assert driver == one
    for name, tokens, reused, plain, expected in driver:
        assert tokens == plain, name
        if expected >= 0:
            assert reused == expected, (name, reused)
