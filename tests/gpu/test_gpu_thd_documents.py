"""GPU tier: document masking on a THD micro-batch through Transformer Engine's attention
equals the CPU twin (our SDPA core attention, fp32, on the CPU), output and q/k/v gradients;
and the twin's own CUDA path (bf16) equals its CPU fp32 result. Skipped without CUDA; the TE
comparison also without transformer_engine. Run with `pytest -m gpu tests/gpu`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _parts():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_check_parts",
                                                  REPO / "benchmarks" / "gpu_check_parts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check_parts"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def single_process():
    from megatron_longctx.checkpoint.model_io import single_process_group

    with single_process_group():
        yield


@needs_cuda
def test_te_thd_attention_equals_the_cpu_twin(single_process) -> None:
    from megatron_longctx.model.build import te_available

    parts = _parts()
    result = parts._thd_attention_compare(te_available())
    assert max(result["twin_bf16_vs_fp32"].values()) <= parts.THD_ATTN_RTOL, result
    if not te_available():
        pytest.skip("transformer_engine.pytorch is not importable (twin compared only)")
    assert max(result["te_bf16_vs_fp32"].values()) <= parts.THD_ATTN_RTOL, result
