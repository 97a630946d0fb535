"""`make demo`'s driver end to end on a reduced corpus (the same tools and flags)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_reduced_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py"), "--output-dir", str(out),
         "--total-words", "400000", "--workers", "2", "--model-preset", "tiny",
         "--stage1-iters", "3", "--stage2-iters", "2", "--tokens-per-step", "1024",
         "--stage1-tokens-per-step", "512",
         "--short-length", "128", "--long-length", "512", "--needle-depths", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max |diff|" in proc.stdout and ": OK" in proc.stdout
    # Stage 3 trained twice through the real trainer: stage 2 from stage 1's weights.
    from megatron_longctx.checkpoint import meta as checkpoint_meta

    for stage, iters, seq in (("stage1", 3, 128), ("stage2", 2, 512)):
        meta = checkpoint_meta.read_meta(
            checkpoint_meta.resolve_checkpoint(out / "checkpoints" / stage))
        assert meta["iteration"] == iters and meta["model"]["seq_length"] == seq
    assert "lm loss" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    for key in ("needle_before", "needle_after", "needle_short_before", "needle_short_after"):
        assert 0.0 <= report[key] <= 100.0
    assert report["settings"]["long_length"] == 512
    assert len(list((out / "eval").glob("needle_*/heatmap.png"))) == 4
    assert str(out / "report.md") in proc.stdout
    plan = json.loads((out / "mixture" / "mixture_plan.json").read_text())
    assert plan["strategy"] == "per-source" and len(plan["domains"]) == 7
    # Stage 1 trains on the natural mixture, stage 2 on the per-source one.
    plan1 = json.loads((out / "mixture_stage1" / "mixture_plan.json").read_text())
    assert plan1["strategy"] == "original"
    assert report["settings"]["strategy"] == "per-source"
    cells = json.loads((out / "eval" / "needle_stage1_512" / "results.json").read_text())
    assert cells["settings"]["max_new_tokens"] == 2 and len(cells["cells"]) == 2
    assert (out / "mixture" / "report.md").exists()
    assert len(list((out / "data").glob("slimpajama_*_text_document.idx"))) == 7
