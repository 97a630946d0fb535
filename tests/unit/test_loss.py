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
from tests.allocations import Allocations

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


@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "mask"])
def test_no_gradient_work_under_no_grad(mask: bool) -> None:
    """Evaluation (torch.no_grad) with the trainer's mask: one GEMM per chunk and no gradient
    buffer ([V, h] weight gradient, [tokens, h] hidden gradient) is ever allocated, measured
    op by op; a training forward allocates both (the check can see them)."""
    hidden, weight, labels = _inputs()
    loss_mask = torch.ones(B, S) if mask else None
    chunk = 16
    chunks = -(-S * B // chunk)
    gemms = {"mm", "addmm", "matmul"}

    def run() -> Allocations:
        with Allocations() as seen:
            vocab_parallel_chunked_cross_entropy(hidden, weight, labels, vocab_size=V,
                                                 chunk_tokens=chunk, loss_mask=loss_mask)
        return seen

    with torch.no_grad():
        seen = run()
    shapes = seen.shapes()
    assert sum(name in gemms for name, _ in seen.ops) == chunks
    assert (V, H) not in shapes and (S * B, H) not in shapes
    if mask:
        training = run()
        assert sum(name in gemms for name, _ in training.ops) > chunks
        assert (V, H) in training.shapes()


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(torch.float32).tiny)))
    return torch.exp2(exponent - 7)


_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize("mode", ["recompute", "eager"])
def test_bf16_weight_gradient_is_accumulated_in_fp32(mode: str, device: str) -> None:
    """bf16, 32 chunks: the weight gradient in main_grad equals the fp32 sum of the bf16
    per-token gradients (megatron's one fp32-accumulating GEMM into main_grad) within one bf16
    ulp; rounding each chunk's product to bf16 before adding it was up to ~3,000 ulps off
    where chunks cancel. On CUDA through torch's fp32-output GEMM (`out_dtype`)."""
    s, b, h, v, chunk = 256, 2, 64, 200, 16  # 512 tokens, 32 chunks; V not a multiple of 128
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(s, b, h, generator=gen).bfloat16().to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 0.3).bfloat16().to(device).requires_grad_()
    labels = torch.randint(0, v, (b, s), generator=gen).to(device)
    if device == "cuda":  # the fp32-output GEMM exists there (torch >= 2.8)
        assert loss_module._fp32_accumulation(hidden.device, torch.bfloat16) in ("addmm", "mm")
    # Reference: the stock path's bf16 gradient of the logits (fp32 softmax gradient cast to
    # bf16, as ColumnParallelLinear's backward receives it), summed over tokens in float64.
    # (logits GEMM'd per chunk, as the loss does: on CUDA a GEMM's rounding depends on its
    # shape, and the test is about the accumulation, not the logits)
    logits = torch.cat([torch.matmul(x, weight.detach().t()) for x in
                        hidden.detach().reshape(-1, h).split(chunk)]).view(s, b, v)
    logits = logits.float().requires_grad_()
    F.cross_entropy(logits.reshape(-1, v), labels.t().reshape(-1), reduction="sum").backward()
    grad_logits = logits.grad.bfloat16().double().reshape(-1, v)
    ref = (grad_logits.t() @ hidden.detach().double().reshape(-1, h)).float()
    weight.main_grad = torch.zeros(v, h, device=device)
    got = vocab_parallel_chunked_cross_entropy(
        hidden, weight, labels, vocab_size=v, chunk_tokens=chunk, accumulate_main_grad=True,
        loss_mask=torch.ones(b, s, device=device) if mode == "eager" else None)
    got.sum().backward()
    ulps = ((weight.main_grad - ref).abs() / _bf16_ulp(ref)).max()
    assert ulps <= 1, f"{float(ulps):.2f} bf16 ulps from the fp32-accumulated reference"


def test_fp16_loss_scale_is_applied_before_the_gradient_is_formed() -> None:
    """fp16 with a loss scale (megatron's Float16Module path: the loss func's gradient is
    loss_scale / tokens per masked token): vocabulary rows whose probabilities are ~1e-9 get
    their gradient from the scaled softmax, as in the stock path; formed unscaled in fp16 they
    underflowed to zero."""
    s, b, h, v = 32, 2, 16, 96
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(s, b, h, generator=gen) * 0.1
    hidden[..., 0] = 1
    hidden = hidden.half()
    weight = torch.randn(v, h, generator=gen) * 0.1
    weight[v // 2:, 0] = -15  # logits 15 below the others: p ~ 6e-9, x 2^16 / 64 tokens ~ 6e-6
    weight = weight.half()
    labels = torch.randint(0, v // 2, (b, s), generator=gen)
    mask = torch.ones(b, s)
    loss_scale = 2.0 ** 16

    def grads(chunked: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if chunked:
            losses = vocab_parallel_chunked_cross_entropy(x, w, labels, vocab_size=v,
                                                          chunk_tokens=8, loss_mask=mask)
        else:  # the stock path: fp16 logits upcast, fp32 cross-entropy
            logits = torch.matmul(x, w.t()).float()
            losses = F.cross_entropy(logits.reshape(-1, v), labels.t().reshape(-1),
                                     reduction="none").view(s, b).t()
        ((losses * mask).sum() * loss_scale / mask.sum()).backward()
        return x.grad.float(), w.grad.float()

    stock, chunked = grads(False), grads(True)
    far = stock[1][v // 2:]
    assert (far != 0).float().mean() > 0.9  # the stock path keeps these gradients
    assert not ((far != 0) & (chunked[1][v // 2:] == 0)).any()
    assert _rel(chunked[1], stock[1]) < 2e-3 and _rel(chunked[0], stock[0]) < 2e-3
