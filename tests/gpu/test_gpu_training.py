"""GPU tier: the trainer on a CUDA device (local SDPA path, and TE/FP8 where TE imports).

Skipped without CUDA (CI, CPU machines); run on a lent H100 with `pytest -m gpu tests/gpu`.
Each test runs the real entrypoint in a subprocess (one process, mock data, tiny model).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]
LOSS_RE = re.compile(r"iteration\s+(\d+)/.*?lm loss: ([-+0-9.eE]+|nan)")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _te() -> bool:
    from megatron_longctx.model.build import te_available

    return torch.cuda.is_available() and te_available()


#: tiny-demo's width (256) with LLaMA's head dim 128 (2 heads, MHA): TE's fused FP8 attention
#: on sm90 trains only with head dim 128, and the kernels users run are the head-dim-128 ones.
LLAMA_HEADS = ["--num-attention-heads", "2", "--group-query-attention", "--num-query-groups", "2"]


def run_trainer(tmp_path: Path, *extra: str, iters: int = 20) -> list[float]:
    cmd = [sys.executable, str(REPO / "pretrain_longctx.py"), "--model-preset", "tiny-demo",
           *LLAMA_HEADS,
           "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "2048",
           "--seq-length", "4096", "--micro-batch-size", "1", "--global-batch-size", "4",
           "--train-iters", str(iters), "--lr", "1e-3", "--save", str(tmp_path / "ckpt"),
           "--tensorboard-dir", str(tmp_path / "tb"), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(m.group(2)) for m in LOSS_RE.finditer(proc.stdout)]
    assert len(losses) == iters, proc.stdout[-2000:]
    return losses


@needs_cuda
def test_local_sdpa_bf16_trains(tmp_path):
    """bf16 with the plain optimizer: megatron checks every parameter is a CUDA tensor (the
    RMSNorm weight used to stay on the CPU there)."""
    losses = run_trainer(tmp_path, "--bf16", "--transformer-impl", "local")
    assert all(x == x for x in losses) and losses[-1] < losses[0] - 0.1


@needs_cuda
@pytest.mark.skipif(not _te(), reason="needs Transformer Engine")
def test_te_bf16_trains(tmp_path):
    losses = run_trainer(tmp_path, "--bf16", "--transformer-impl", "transformer_engine")
    assert losses[-1] < losses[0] - 0.1


@needs_cuda
@pytest.mark.skipif(not _te() or torch.cuda.get_device_capability() < (9, 0),
                    reason="FP8 needs TE on sm90+")
def test_te_fp8_with_fp8_attention_trains(tmp_path):
    losses = run_trainer(tmp_path, "--bf16", "--transformer-impl", "transformer_engine",
                         "--fp8-format", "hybrid", "--fp8-amax-history-len", "16",
                         "--fp8-amax-compute-algo", "max", "--fp8-dot-product-attention")
    assert losses[-1] < losses[0] - 0.1


@needs_cuda
def test_every_parameter_and_buffer_on_cuda():
    from tests.distributed.spawn import run_distributed
    from tests.distributed.test_build import _placement

    for dtype, distopt in (("fp32", False), ("bf16", False), ("bf16", True)):
        assert run_distributed(_placement, 1, dtype, distopt)[0] == []
