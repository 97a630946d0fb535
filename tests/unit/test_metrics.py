"""Training metrics: exact FLOP counts (causal attention, as NeMo/Megatron count), peaks, meter
math, TensorBoard, console."""

from __future__ import annotations

import pytest

from megatron_longctx.config.presets import count_parameters, get_preset, with_context
from megatron_longctx.training.metrics import (
    MetricsWriter,
    ThroughputMeter,
    attention_flops_per_token,
    domain_loss_tag,
    flops_per_token,
    format_console_line,
    matmul_params,
    memory_stats,
    peak_tflops,
)

S128K = 131072


def test_llama2_7b_at_128k_matches_published_count() -> None:
    cfg = get_preset("llama2-7b")
    n = matmul_params(cfg)
    # 32 x (4 x 4096^2 + 3 x 4096 x 11008) + 4096 x 32000
    assert n == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000 == 6_607_077_376
    causal = flops_per_token(cfg, S128K)
    assert causal == 6 * n + 6 * 32 * 4096 * S128K == 142_721_679_360
    assert abs(causal / 1e9 - 143) < 0.5  # LLaMA-2 7B at 128K: ~143 GFLOP/token
    share = attention_flops_per_token(cfg, S128K) / causal
    assert abs(share - 0.722) < 0.001  # of which attention ~72%

    full = flops_per_token(cfg, S128K, causal=False)
    assert full == 6 * n + 12 * 32 * 4096 * S128K == 245_800_894_464
    assert abs(attention_flops_per_token(cfg, S128K, causal=False) / full - 0.839) < 0.001
    # seq_length defaults to the config's
    assert flops_per_token(with_context(cfg, S128K)) == causal


def test_llama3_8b_gqa_shrinks_k_and_v() -> None:
    cfg = get_preset("llama3-8b")
    h, kv = 4096, 8 * 128  # 8 query groups x head_dim 128
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * 14336
    assert matmul_params(cfg) == 32 * per_layer + h * 128256 == 7_504_658_432
    # every matmul weight is a parameter; the rest are the input embedding and the norms
    norms = 32 * 2 * h + h
    assert matmul_params(cfg) == count_parameters(cfg) - h * 128256 - norms
    # attention FLOPs do not shrink with GQA: every query head still meets every key
    assert attention_flops_per_token(cfg, S128K) == 6 * 32 * 4096 * S128K


def test_tiny_config_by_hand() -> None:
    cfg = get_preset("tiny")  # L=2, h=64, ffn=176, 4 heads / 2 groups (head_dim 16), vocab 512
    # per layer: q 64*64=4096, k+v 2*64*32=4096, out 4096, mlp 3*64*176=33792 -> 46080
    # x2 layers = 92160, + logits 64*512 = 32768 -> 124928
    assert matmul_params(cfg) == 124_928
    # 6*124928 = 749568; causal attention 6*2*64*64 = 49152; non-causal 98304
    assert flops_per_token(cfg, 64) == 798_720
    assert flops_per_token(cfg, 64, causal=False) == 847_872
    # tying the output layer to the embedding changes parameters, not matmul FLOPs
    cfg.untie_embeddings_and_output_weights = False
    assert matmul_params(cfg) == 124_928


def test_peak_tflops_table_and_override() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16", False) == 989
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16", True) == 1979
    assert peak_tflops("NVIDIA H100 PCIe", "bf16", False) == 756
    assert peak_tflops("NVIDIA H100 PCIe", "fp16", True) == 1513
    assert peak_tflops("NVIDIA H200", "bf16", True) == 1979
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16", False) == 312
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16", True) is None
    assert peak_tflops(None, "bf16", False) is None
    assert peak_tflops("cpu", "fp32", False) is None
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp32", False) is None
    assert peak_tflops("Some Future GPU", "bf16", False) is None
    assert peak_tflops(None, "fp32", False, override=100.0) == 100.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16", False, override=800) == 800
    with pytest.raises(ValueError, match="--peak-tflops"):
        peak_tflops(None, "bf16", False, override=0)


def test_meter_reproduces_nemo_published_throughput() -> None:
    # NeMo LLaMA-2 7B FP8 128K on 128 H100: ~2,260 tokens/s/GPU <-> 555 TFLOPS by the
    # non-causal count. Global batch 8 sequences of 128K.
    cfg = get_preset("llama2-7b")
    tokens = 8 * S128K
    iteration_time = tokens / (2260 * 128)
    meter = ThroughputMeter(tokens, 128, flops_per_token(cfg, S128K, causal=False),
                            peak_tflops("NVIDIA H100 80GB HBM3", "bf16", False))
    out = meter.update(iteration_time)
    assert out["tokens_per_s"] == pytest.approx(2260 * 128)
    assert out["tokens_per_s_per_device"] == pytest.approx(2260)
    assert out["tflops_per_device"] == pytest.approx(555.5, abs=0.1)
    # MFU against the bf16 peak although the run is FP8, as NeMo's and Megatron-LM's are.
    assert out["mfu"] == pytest.approx(555.51 / 989, rel=1e-3)


def test_meter_simple_math_and_unknown_peak() -> None:
    meter = ThroughputMeter(tokens_per_iteration=1000, world_size=4, flops_per_token=1e9)
    out = meter.update(0.5)
    assert out == {"tokens_per_s": 2000.0, "tokens_per_s_per_device": 500.0,
                   "tflops_per_device": 0.5, "mfu": None}
    assert ThroughputMeter(1000, 4, 1e9, peak_tflops=2.0).update(0.5)["mfu"] == 0.25
    with pytest.raises(ValueError):
        meter.update(0.0)
    with pytest.raises(ValueError):
        ThroughputMeter(0, 4, 1e9)


def test_memory_stats_reports_host_peak() -> None:
    stats = memory_stats()
    assert 0 < stats["max_rss_gb"] < 1024
    assert all(isinstance(v, float) for v in stats.values())


def test_writer_writes_events_tensorboard_reads(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(str(tmp_path), is_logging_rank=True) as writer:
        assert writer.enabled
        for step in (1, 2):
            writer.add_scalars(step, {"lm loss": 5.0 / step, "loss-scale": None,
                                      domain_loss_tag("arxiv"): 4.0, "mfu": 0.25})
        writer.flush()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert set(tags) == {"lm loss", "lm loss/arxiv", "mfu"}  # None skipped
    events = acc.Scalars("lm loss")
    assert [e.step for e in events] == [1, 2]
    assert [e.value for e in events] == pytest.approx([5.0, 2.5])


def test_writer_is_noop_off_the_logging_rank(tmp_path) -> None:
    for writer in (MetricsWriter(str(tmp_path), is_logging_rank=False),
                   MetricsWriter(None, is_logging_rank=True)):
        assert not writer.enabled
        writer.add_scalars(1, {"lm loss": 1.0})
        writer.flush()
        writer.close()
    assert not any(tmp_path.iterdir())


def test_console_line_fields() -> None:
    values = {
        "consumed-samples": 80, "iteration-time": 0.1234, "learning-rate": 2e-5,
        "global-batch-size": 8, "lm loss": 5.123456, "lm loss/arxiv": 5.0123,
        "lm loss/book": float("nan"), "grad-norm": 1.2341, "loss-scale": None,
        "tokens-per-second": 1234.4, "tflops-per-device": 1.234, "mfu": 0.1234,
        "skipped-iterations": 0, "nan-iterations": 0,
    }
    line = format_console_line(10, 100, values)
    assert line.startswith(" iteration       10/     100 | consumed samples: 80 | ")
    for field in ("elapsed time per iteration (ms): 123.4", "learning rate: 2.000E-05",
                  "global batch size: 8", "lm loss: 5.123456E+00",
                  "domain losses: arxiv 5.0123, book nan", "grad norm: 1.234",
                  "tokens/s: 1234", "TFLOP/s/device: 1.2", "MFU: 12.3%",
                  "number of skipped iterations: 0", "number of nan iterations: 0 |"):
        assert field in line, (field, line)
    assert "loss scale" not in line and "\n" not in line
    short = format_console_line(1, 2, {"lm loss": 1.0, "mfu": None})
    assert short == " iteration        1/       2 | lm loss: 1.000000E+00 |"
