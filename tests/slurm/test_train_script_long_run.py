"""examples/train_128k.sh turns on async saves, retention and W&B (offline without a key) for
GPU runs, and leaves the CPU smoke run as it was; the trainer accepts the resulting flags."""

from __future__ import annotations

import shlex

from tests.slurm.test_examples_static import _calls, _launch, _shims


def _srun_argv(tmp_path, **env):
    plan = tmp_path / "mixture_plan.json"
    plan.write_text("{}")
    proc = _launch(tmp_path, _shims(tmp_path), MIXTURE_PLAN=str(plan),
                   HF_MODEL_DIR="/models/hf", **env)
    assert proc.returncode == 0, proc.stderr
    srun = [line for line in _calls(tmp_path).splitlines() if line.startswith("srun ")][-1]
    return shlex.split(srun)


def _trainer_flags(argv):
    return argv[next(i for i, a in enumerate(argv) if a.endswith("pretrain_longctx.py")) + 1:]


def test_gpu_run_saves_async_keeps_two_and_logs_to_wandb_offline(tmp_path, monkeypatch):
    from megatron_longctx.config.training import parse_pretrain_args

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    argv = _srun_argv(tmp_path, SMOKE="0", SLURM_NTASKS="8")
    assert "WANDB_MODE=offline" in argv[:argv.index(next(a for a in argv
                                                         if a.endswith("pretrain_longctx.py")))]
    cfg = parse_pretrain_args(_trainer_flags(argv))
    assert cfg.checkpoint.async_save and cfg.checkpoint.keep_last_checkpoints == 2
    assert cfg.checkpoint.keep_checkpoints_every == 1000
    assert cfg.logging.wandb_project == "megatron-longctx"
    assert cfg.logging.wandb_save_dir == str(tmp_path / "run")
    cfg.validate(8, te_available=True)


def test_wandb_key_means_online_and_cpu_smoke_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x")
    argv = _srun_argv(tmp_path, SMOKE="0", SLURM_NTASKS="8")
    assert not any(a.startswith("WANDB_MODE=") for a in argv)
    smoke = _srun_argv(tmp_path, SMOKE="1")
    assert not {"--async-save", "--wandb-project", "--keep-last-checkpoints"} & set(smoke)
