"""The one-node test cluster itself: batch jobs with srun steps, fake GPUs, exit codes."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.slurm

TWO_TASKS = """#!/bin/bash
set -euo pipefail
srun --label bash -c 'echo "rank $SLURM_PROCID of $SLURM_NTASKS gpus=${CUDA_VISIBLE_DEVICES:-none}"'
"""


def test_fake_gpus_accepted_and_visible(slurm_cluster, tmp_path):
    script = tmp_path / "gpus.sh"
    script.write_text(TWO_TASKS)
    out = tmp_path / "gpus.out"
    job_id, rc = slurm_cluster.sbatch(["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=8",
                                       f"--output={out}", str(script)])
    assert rc == 0 and slurm_cluster.job_state(job_id) == "COMPLETED"
    assert "0: rank 0 of 2 gpus=0,1,2,3,4,5,6,7" in out.read_text()


def test_sbatch_wait_two_task_srun(slurm_cluster, tmp_path):
    script = tmp_path / "two.sh"
    script.write_text(TWO_TASKS)
    out = tmp_path / "two.out"
    # The real `sbatch --wait` (its exit code is the job's); the fixture's helper polls instead.
    proc = slurm_cluster.run(["sbatch", "--wait", "--ntasks=2", f"--output={out}", str(script)],
                             check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(out.read_text().splitlines())
    assert lines == ["0: rank 0 of 2 gpus=none", "1: rank 1 of 2 gpus=none"]


def test_impossible_requests_fail_at_submit(slurm_cluster, tmp_path):
    script = tmp_path / "never.sh"
    script.write_text("#!/bin/bash\ntrue\n")
    for flag in ("--gpus-per-node=9", f"--ntasks={slurm_cluster.cpus + 1}"):
        with pytest.raises(subprocess.CalledProcessError) as err:
            slurm_cluster.sbatch([flag, str(script)], wait=False)
        assert "Batch job submission failed" in err.value.stderr


def test_job_exit_code_and_state(slurm_cluster, tmp_path):
    script = tmp_path / "fail.sh"
    script.write_text("#!/bin/bash\nexit 3\n")
    job_id, rc = slurm_cluster.sbatch([f"--output={tmp_path / 'fail.out'}", str(script)])
    assert rc == 3
    assert slurm_cluster.job_state(job_id) == "FAILED"


def test_finished_jobs_leave_no_zombies(slurm_cluster, tmp_path):
    script = tmp_path / "z.sh"
    script.write_text(TWO_TASKS)
    _, rc = slurm_cluster.sbatch(["--ntasks=2", f"--output={tmp_path / 'z.out'}", str(script)])
    assert rc == 0
    assert slurm_cluster.new_zombies() == []
