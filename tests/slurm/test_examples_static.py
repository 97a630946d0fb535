"""Launch scripts without a cluster: syntax, shellcheck, and the checks that run before srun."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "examples").glob("*.sh"))
NAMES = [p.name for p in SCRIPTS]


def test_expected_scripts_exist():
    assert {"train_128k.sh", "prepare_data.sh", "blend_data.sh", "submit_data_pipeline.sh",
            "eval_needle.sh"} <= set(NAMES)


@pytest.mark.parametrize("script", SCRIPTS, ids=NAMES)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n") and "set -euo pipefail" in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    proc = subprocess.run(["shellcheck", "-s", "bash", *map(str, SCRIPTS)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout


def test_eval_needle_grid_is_the_papers(tmp_path):
    """40 lengths = round(linspace(1000, 128000, 40)), 10 depths; PYTHON=echo shows the call."""
    env = dict(os.environ, PYTHON="echo", OUTPUT_DIR=str(tmp_path / "needle"),
               MODEL="/m", TOKENIZER_MODEL="/t")
    proc = subprocess.run(["bash", str(REPO / "examples" / "eval_needle.sh")], env=env,
                          capture_output=True, text=True, check=True)
    args = proc.stdout.split()
    assert args[0].endswith("tools/eval_needle.py")
    lengths = [int(x) for x in args[args.index("--lengths") + 1:args.index("--depths")]]
    assert lengths == np.round(np.linspace(1000, 128000, 40)).astype(int).tolist()
    assert args[args.index("--depths") + 1] == "10"
    assert args[args.index("--model") + 1] == "/m"
    assert (tmp_path / "needle" / "command.sh").exists()


def _train(env_updates: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(RUN_DIR=str(tmp_path / "run"), **env_updates)
    return subprocess.run(["bash", str(REPO / "examples" / "train_128k.sh")], env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("env", "message"), [
    ({}, "submit with sbatch"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "12"}, "not a multiple of TP*CP*PP = 2*4*1"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "24"}, "GLOBAL_BATCH_SIZE 32 % (MICRO_BATCH_SIZE 1"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SEQ_LENGTH": "131076"}, "% (TP*2*CP = 16)"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "PRECISION": "fp4"}, "PRECISION must be"),
], ids=["no-sbatch", "world", "batch", "seq", "precision"])
def test_train_script_fails_early_with_the_formula(tmp_path, env, message):
    proc = _train(env, tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing created before the checks pass

