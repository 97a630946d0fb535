"""A training run starts from an HF LLaMA converted by tools/convert_checkpoint.py (issue 6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from megatron_longctx import checkpoint_meta
from tests.distributed.trainer_harness import make_config, train
from tests.unit.test_convert import make_hf

REPO = Path(__file__).resolve().parents[2]


def test_training_starts_from_converted_hf(tmp_path, init_ckpt):
    # The harness's tiny LLaMA shape: 4 layers, hidden 64, GQA 4/2, SwiGLU 176, vocab 512.
    make_hf(tmp_path / "hf", num_hidden_layers=4, vocab_size=512)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "hf-to-megatron",
         "--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "converted"),
         "--tensor-model-parallel-size", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    converted = str(tmp_path / "converted")
    assert not checkpoint_meta.read_meta(
        checkpoint_meta.resolve_checkpoint(converted))["has_optimizer"]

    one = train(make_config(load=converted, save=str(tmp_path / "run1"), iters=2), 1)
    two = train(make_config(load=converted, save=str(tmp_path / "run2"), iters=2, tp=2), 2)
    assert one["iteration"] == 2 and one["exit_code"] == 0
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < 1e-5
    # The converted weights were used: a random init gives a clearly different loss.
    fresh = train(make_config(load=init_ckpt, iters=1), 1)
    assert abs(one["losses"][0] - fresh["losses"][0]) > 0.1
    # The run's own checkpoint is a full training checkpoint at iteration 2.
    meta = checkpoint_meta.read_meta(checkpoint_meta.resolve_checkpoint(tmp_path / "run1"))
    assert meta["iteration"] == 2 and meta["has_optimizer"]
    assert meta["hf_config"]["num_hidden_layers"] == 4  # carried for megatron-to-hf
