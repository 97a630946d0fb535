"""Throughput accounting with document masking: attention FLOPs follow the documents."""

from __future__ import annotations

import pytest

from megatron_longctx.config.presets import get_preset
from megatron_longctx.training import metrics


def test_one_document_per_row_is_the_causal_count() -> None:
    model = get_preset("llama2-7b")
    s = 131072
    assert metrics.document_masked_flops(model, s, float(s * s)) == pytest.approx(
        metrics.flops_per_token(model, s) * s, rel=1e-12)


def test_many_documents_cut_the_attention_share() -> None:
    model = get_preset("llama2-7b")
    s, n = 131072, 400
    docs = n * float(s // n) ** 2  # 400 documents of 327 tokens
    dense = 6.0 * metrics.matmul_params(model) * s
    masked = metrics.document_masked_flops(model, s, docs)
    causal = metrics.flops_per_token(model, s) * s
    assert (masked - dense) == pytest.approx((causal - dense) / n, rel=1e-2)
    meter = metrics.ThroughputMeter(s, 8, metrics.flops_per_token(model, s), 989.0)
    full, per_doc = meter.update(10.0), meter.update(10.0, masked)
    assert per_doc["tflops_per_device"] == pytest.approx(masked / 10.0 / 8 / 1e12)
    assert per_doc["tokens_per_s"] == full["tokens_per_s"]
    assert per_doc["mfu"] < full["mfu"] / 3
