"""The chunked cross-entropy (model/loss.py) in one process: exact against a plain-torch
reference (full logits + F.cross_entropy), padded rows excluded, every chunking, the
main_grad path, and the flags. Stock-vs-chunked on a real GPTModel and the parallel layouts
are in tests/distributed/test_loss_parallel.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_longctx.config.model import PrecisionConfig
from megatron_longctx.model import loss as loss_module
from megatron_longctx.model.loss import vocab_parallel_chunked_cross_entropy

S, B, H, V = 37, 2, 16, 96


def _inputs(dtype: torch.dtype = torch.float32, vocab: int = V, rows: int = V):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(S, B, H, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(rows, H, generator=gen) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (B, S), generator=gen)
    return hidden, weight, labels


def _reference(hidden, weight, labels, vocab: int = V):
    """Plain torch on full fp32 logits over the first `vocab` rows: [b, s] losses."""
    logits = torch.matmul(hidden, weight.t()).float()[..., :vocab]
    loss = F.cross_entropy(logits.reshape(-1, vocab), labels.t().reshape(-1), reduction="none")
    return loss.view(S, B).t()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _token_scales(mode: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(loss_mask passed to the loss, per-token gradient of the losses) for each path:
    recompute (no mask), eager (gradient = 2.5 x mask, as the trainer's loss func gives) and
    eager-fallback (mask given, but the losses are used otherwise)."""
    gen = torch.Generator().manual_seed(5)
    mask = (torch.rand(B, S, generator=gen) > 0.2).float()
    if mode == "recompute":
        return None, torch.rand(B, S, generator=gen)
    if mode == "eager":
        return mask, 2.5 * mask
    return mask, torch.rand(B, S, generator=gen)


@pytest.mark.parametrize("mode", ["recompute", "eager", "eager-fallback"])
@pytest.mark.parametrize("chunk", [1, 5, 32, 74, 4096], ids=lambda c: f"chunk{c}")
def test_loss_and_gradients_equal_full_logits(chunk: int, mode: str, monkeypatch) -> None:
    calls = []
    original = loss_module._chunk_logits
    monkeypatch.setattr(loss_module, "_chunk_logits",
                        lambda *args: calls.append(1) or original(*args))
    hidden, weight, labels = _inputs()
    mask, scale = _token_scales(mode)
    ref = _reference(hidden, weight, labels)
    (ref * scale).sum().backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = vocab_parallel_chunked_cross_entropy(hidden, weight, labels, vocab_size=V,
                                               chunk_tokens=chunk, loss_mask=mask)
    assert got.shape == (B, S) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    (got * scale).sum().backward()
    assert _rel(hidden.grad, ref_grads[0]) < 1e-6
    assert _rel(weight.grad, ref_grads[1]) < 1e-6
    chunks = -(-S * B // chunk)
    assert len(calls) == (chunks if mode == "eager" else 2 * chunks)  # no recompute if eager


def test_padded_rows_are_excluded_exactly() -> None:
    """A padded table (96 -> 128 rows, random padded rows) gives the loss of the unpadded
    vocabulary, and its padded rows get zero gradient."""
    hidden, weight, labels = _inputs(vocab=V, rows=128)
    got = vocab_parallel_chunked_cross_entropy(hidden, weight, labels, vocab_size=V,
                                               chunk_tokens=8)
    ref = _reference(hidden.detach(), weight.detach(), labels, vocab=V)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    with_pad = _reference(hidden.detach(), weight.detach(), labels, vocab=128)
    assert (with_pad - got).abs().max() > 1e-3  # the stock path would include them
    got.sum().backward()
    assert weight.grad[V:].abs().max() == 0
    assert weight.grad[:V].abs().max() > 0


def test_zero_output_rows_of_a_converted_model_do_not_count() -> None:
    """A converted checkpoint's padded rows are zero (logit 0)."""
    hidden, weight, labels = _inputs(vocab=V, rows=128)
    with torch.no_grad():
        weight[V:] = 0
    got = vocab_parallel_chunked_cross_entropy(hidden, weight, labels, vocab_size=V)
    torch.testing.assert_close(got, _reference(hidden.detach(), weight.detach(), labels),
                               rtol=1e-6, atol=1e-6)


def test_padded_vocab_size_rows_are_excluded_from_the_trainers_loss() -> None:
    """--padded-vocab-size keeps the tokenizer's vocabulary as the model's, so the built model
    excludes the extra rows exactly as it does Megatron's rounding padding."""
    import dataclasses

    from megatron_longctx.checkpoint.model_io import single_process_group
    from megatron_longctx.config.model import ParallelConfig
    from megatron_longctx.config.presets import get_preset
    from megatron_longctx.config.training import parse_pretrain_args, resolve_vocabulary
    from megatron_longctx.model.build import build_model

    cfg = parse_pretrain_args(["--model-preset", "tiny", "--padded-vocab-size", "512",
                               "--train-iters", "1", "--seq-length", "64",
                               "--max-position-embeddings", "64"])
    model_cfg = resolve_vocabulary(cfg, 300)
    assert dataclasses.replace(get_preset("tiny"), vocab_size=300, padded_vocab_rows=512) \
        .padded_vocab(1) == 512
    with single_process_group():
        model = build_model(model_cfg, ParallelConfig(), PrecisionConfig(), device="cpu",
                            use_cpu_initialization=True)
    assert model.unpadded_vocab_size == 300
    assert model.output_layer.weight.shape[0] == 512


def test_bf16_matches_megatrons_rounding() -> None:
    """bf16 GEMM output upcast to fp32, as megatron's output layer + cross-entropy do."""
    hidden, weight, labels = _inputs(torch.bfloat16)
    got = vocab_parallel_chunked_cross_entropy(hidden, weight, labels, vocab_size=V,
                                               chunk_tokens=16)
    torch.testing.assert_close(got, _reference(hidden, weight, labels), rtol=1e-6, atol=1e-6)
    got.sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16


def test_weight_gradient_accumulates_into_main_grad() -> None:
    """Gradient-accumulation fusion: added to megatron DDP's fp32 main_grad, the placeholder
    flagged so DDP's hook does not add it a second time."""
    hidden, weight, labels = _inputs()
    ref = _reference(hidden, weight, labels)
    ref.sum().backward()
    expected = weight.grad.clone()
    weight.grad = None
    for mask in (None, torch.ones(B, S)):  # recompute path, then the eager one
        weight.main_grad = torch.ones_like(weight, dtype=torch.float32)
        weight.grad_added_to_main_grad = False
        vocab_parallel_chunked_cross_entropy(hidden, weight, labels, vocab_size=V,
                                             chunk_tokens=7, accumulate_main_grad=True,
                                             loss_mask=mask).sum().backward()
        assert weight.grad_added_to_main_grad
        assert _rel(weight.main_grad - 1, expected) < 1e-6


def test_forward_without_grad_keeps_nothing() -> None:
    hidden, weight, labels = _inputs()
    with torch.no_grad():
        got = vocab_parallel_chunked_cross_entropy(hidden, weight, labels, vocab_size=V)
    assert got.grad_fn is None
    torch.testing.assert_close(got, _reference(hidden.detach(), weight.detach(), labels),
                               rtol=1e-6, atol=1e-6)


def test_flags_default_and_validation() -> None:
    assert PrecisionConfig().cross_entropy_impl == "chunked"
    assert PrecisionConfig().cross_entropy_chunk_size == 1024
    with pytest.raises(ValueError, match="--cross-entropy-impl"):
        PrecisionConfig(cross_entropy_impl="fused").validate(te_available=False)
    with pytest.raises(ValueError, match="--cross-entropy-chunk-size"):
        PrecisionConfig(cross_entropy_chunk_size=0).validate(te_available=False)


@pytest.mark.slow
def test_long_context_benchmark_smoke(tmp_path) -> None:
    """benchmarks/bench_long_context.py at toy sizes: both paths run, same step-1 loss
    (1024 = an unpadded vocabulary: with padding the stock loss counts the padded rows)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "bench_long_context.py"), "--lengths", "256",
         "--cp2-lengths", "", "--vocab", "1024", "--iters", "1", "--json", str(out)],
        capture_output=True, text=True, cwd=repo, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    stock, ours = results["megatron/cp1/256"], results["chunked/cp1/256"]
    assert stock["loss"] == ours["loss"] and ours["peak_gb"] > 0, results
