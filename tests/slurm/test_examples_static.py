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



def _shims(tmp_path: Path, **scripts: str) -> Path:
    """A PATH directory of stand-ins for Slurm's and the system's commands (log: calls.log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    defaults = {
        "scontrol": 'echo "scontrol $*" >> "$SHIM_LOG"; [[ $1 == show ]] && echo node1; true',
        "squeue": 'echo 1:00:00',
        "srun": 'echo "srun $*" >> "$SHIM_LOG"; exit "${SHIM_SRUN_RC:-0}"',
    }
    for name, body in {**defaults, **scripts}.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(0o755)
    return bin_dir


# Signal the batch shell itself, as Slurm's --signal=B: does (a shim called inside $(...) has a
# subshell of the script as its parent).
SIGNAL_SCRIPT = ('p=$PPID; while pp=$(ps -o ppid= -p "$p" | tr -d " ") && '
                 'grep -q train_128k "/proc/$pp/cmdline" 2>/dev/null; do p=$pp; done; '
                 'kill -{sig} "$p"; sleep 0.2; echo 1:00:00')


def _launch(tmp_path: Path, bin_dir: Path, **env_updates: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"RUN_DIR": str(tmp_path / "run"), "SMOKE": "1", "SLURM_JOB_ID": "7",
                "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node1",
                "SHIM_LOG": str(tmp_path / "calls.log"),
                "PATH": f"{bin_dir}:{os.environ['PATH']}", **env_updates})
    return subprocess.run(["bash", str(REPO / "examples" / "train_128k.sh")], env=env,
                          capture_output=True, text=True, timeout=60)


def _calls(tmp_path: Path) -> str:
    log = tmp_path / "calls.log"
    return log.read_text() if log.exists() else ""


def test_usr1_during_setup_requeues_without_starting_the_trainer(tmp_path):
    """USR1 while the script is still setting up (here: during its squeue
    call) used to kill the batch shell (exit 138, a failed job). It is recorded from the first
    command and the job is requeued; srun never starts."""
    bin_dir = _shims(tmp_path, squeue=SIGNAL_SCRIPT.format(sig="USR1"))
    proc = _launch(tmp_path, bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert "got SIGUSR1 before the trainer started" in proc.stdout
    assert "requeueing job 7" in proc.stdout
    calls = _calls(tmp_path)
    assert "scontrol requeue 7" in calls and "srun" not in calls


def test_term_during_setup_stops_at_max_restarts(tmp_path):
    bin_dir = _shims(tmp_path, squeue=SIGNAL_SCRIPT.format(sig="TERM"))
    proc = _launch(tmp_path, bin_dir, SLURM_RESTART_COUNT="3", MAX_RESTARTS="3")
    assert proc.returncode == 75
    assert "not requeueing: 3 restarts already" in proc.stderr
    assert "srun" not in _calls(tmp_path)


def test_trainer_exit_75_requeues_and_other_codes_end_the_job(tmp_path):
    proc = _launch(tmp_path, _shims(tmp_path), SHIM_SRUN_RC="75")
    assert proc.returncode == 0 and "requeueing job 7" in proc.stdout
    proc = _launch(tmp_path, _shims(tmp_path), SHIM_SRUN_RC="2")
    assert proc.returncode == 2 and "requeueing" not in proc.stdout


def test_socket_interface_settable_and_recorded(tmp_path):
    proc = _launch(tmp_path, _shims(tmp_path), SOCKET_IFNAME="eth7")
    assert proc.returncode == 0, proc.stderr
    command = (tmp_path / "run" / "command.sh").read_text()
    assert "export GLOO_SOCKET_IFNAME=eth7" in command
    assert "export NCCL_SOCKET_IFNAME=eth7" in command
    proc = _launch(tmp_path, _shims(tmp_path), SOCKET_IFNAME="eth7", NCCL_SOCKET_IFNAME="ib0")
    command = (tmp_path / "run" / "command.sh").read_text()
    assert "export GLOO_SOCKET_IFNAME=eth7" in command
    assert "export NCCL_SOCKET_IFNAME=ib0" in command


def test_loopback_hostname_picks_the_default_route_interface(tmp_path):
    """Where the host name resolves to 127.0.1.1 (Debian's default) gloo
    binds to loopback and a multi-node rendezvous fails; the script then names an interface."""
    bin_dir = _shims(tmp_path, getent='echo "127.0.1.1 node1"',
                     ip='echo "default via 10.0.0.1 dev ens5 proto dhcp src 10.0.0.7"')
    proc = _launch(tmp_path, bin_dir, SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="4")
    assert proc.returncode == 0, proc.stderr
    assert "resolves to loopback 127.0.1.1" in proc.stderr and "'ens5'" in proc.stderr
    command = (tmp_path / "run" / "command.sh").read_text()
    assert "export GLOO_SOCKET_IFNAME=ens5" in command
    proc = _launch(tmp_path, bin_dir, SLURM_JOB_NUM_NODES="1")  # one node: loopback works
    assert "GLOO_SOCKET_IFNAME" not in (tmp_path / "run" / "command.sh").read_text()


# The batch shell seen from a shim started by srun's background launch.
FIND_SHELL = ('p=$PPID; while pp=$(ps -o ppid= -p "$p" | tr -d " ") && '
              'grep -q train_128k "/proc/$pp/cmdline" 2>/dev/null; do p=$pp; done; ')


def test_usr1_that_kills_srun_at_launch_requeues(tmp_path):
    """A USR1 forwarded while srun is only being started ends srun by the signal (exit 138):
    the script requeues instead of failing the job."""
    srun = ('echo "srun $*" >> "$SHIM_LOG"; ' + FIND_SHELL +
            'kill -USR1 "$p"; sleep 2; echo "srun survived" >> "$SHIM_LOG"; exit 0')
    proc = _launch(tmp_path, _shims(tmp_path, srun=srun))
    assert proc.returncode == 0, proc.stderr
    assert "got SIGUSR1: forwarding to the trainer" in proc.stdout
    assert "before the trainer could save" in proc.stdout and "requeueing job 7" in proc.stdout
    assert "srun survived" not in _calls(tmp_path)


def test_usr1_lost_by_a_starting_srun_is_sent_again(tmp_path):
    """srun drops a signal that arrives before its tasks exist; the script sends it once more
    SIGNAL_RESEND_SECS after launch, and the trainer saves and exits 75 -> requeue."""
    srun = ('echo "srun $*" >> "$SHIM_LOG"; trap "" USR1; ' + FIND_SHELL +
            'kill -USR1 "$p"; sleep 0.5; '
            'trap \'echo "trainer got USR1" >> "$SHIM_LOG"; exit 75\' USR1; '
            'for _ in $(seq 100); do sleep 0.1; done; exit 0')
    proc = _launch(tmp_path, _shims(tmp_path, srun=srun), SIGNAL_RESEND_SECS="2")
    assert proc.returncode == 0, proc.stderr
    assert "trainer got USR1" in _calls(tmp_path)
    assert "trainer exited with 75" in proc.stdout and "requeueing job 7" in proc.stdout


def test_model_flags_replace_the_llama2_architecture(tmp_path):
    """MODEL_FLAGS swaps the architecture (LLaMA-3.1 8B here, which keeps its llama3 RoPE at
    base 500000); the trainer accepts the resulting recipe on one 8-GPU node (TP2 x CP4)."""
    import shlex

    from megatron_longctx.config.training import parse_pretrain_args

    plan = tmp_path / "mixture_plan.json"
    plan.write_text("{}")
    proc = _launch(tmp_path, _shims(tmp_path), SMOKE="0", SLURM_NTASKS="8",
                   MODEL_FLAGS="--model-preset llama3.1-8b", ROTARY_BASE="500000",
                   MIXTURE_PLAN=str(plan), HF_MODEL_DIR="/models/hf")
    assert proc.returncode == 0, proc.stderr
    srun = next(line for line in _calls(tmp_path).splitlines() if line.startswith("srun "))
    argv = shlex.split(srun)
    argv = argv[next(i for i, a in enumerate(argv) if a.endswith("pretrain_longctx.py")) + 1:]
    assert "--num-layers" not in argv and "--ffn-hidden-size" not in argv
    assert argv[argv.index("--model-preset") + 1] == "llama3.1-8b"
    cfg = parse_pretrain_args(argv)
    assert (cfg.model.ffn_hidden_size, cfg.model.query_groups, cfg.model.rope_type) == (
        14336, 8, "llama3")
    assert (cfg.model.rotary_base, cfg.model.seq_length) == (500000, 131072)
    cfg.validate(8, te_available=True)
    # without MODEL_FLAGS: LLaMA-2 7B's flags
    proc = _launch(tmp_path, _shims(tmp_path), SMOKE="0", SLURM_NTASKS="8",
                   MIXTURE_PLAN=str(plan), HF_MODEL_DIR="/models/hf")
    assert "--ffn-hidden-size 11008" in _calls(tmp_path).splitlines()[-1]


def _planned(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """train_128k.sh with the real planner (`pretrain_longctx.py --dry-run`) before srun."""
    import sys

    return _launch(tmp_path, _shims(tmp_path), PYTHON=sys.executable, REPO_DIR=str(REPO),
                   PYTHONPATH=str(REPO), **env)


def test_layout_over_memory_is_refused_before_srun(tmp_path):
    """LLaMA-2 7B at 128K on TP1 x CP1 without recompute cannot fit 80 GB: the job stops with
    the estimate and layouts that fit, and srun never runs."""
    proc = _planned(tmp_path, SMOKE="0", SLURM_NTASKS="8", TP="1", CP="1",
                    RECOMPUTE_NUM_LAYERS="0", PRECISION="bf16")
    assert proc.returncode == 2, proc.stderr
    assert "estimated over 80 GB" in proc.stderr
    assert "DOES NOT FIT" in proc.stdout and "flags:" in proc.stdout
    assert "srun" not in _calls(tmp_path)


def test_smoke_layout_passes_the_check_and_plan_check_0_skips_it(tmp_path):
    proc = _planned(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fits in 80 GB" in proc.stdout and "srun" in _calls(tmp_path)
    (tmp_path / "skip").mkdir()
    skipped = _planned(tmp_path / "skip", SMOKE="0", SLURM_NTASKS="8", TP="1", CP="1",
                       RECOMPUTE_NUM_LAYERS="0", PRECISION="bf16", PLAN_CHECK="0")
    assert "DOES NOT FIT" not in skipped.stdout and "srun" in _calls(tmp_path / "skip")
