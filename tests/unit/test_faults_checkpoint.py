"""Fault injection for the checkpoint, evaluation and launch stages: each test keeps
one silent wrong result or traceback fixed.

* Case 1: evaluation loads HF directories strictly (missing/unexpected tensors, foreign
  architectures -> one line naming the directory and tensor, exit 2).
* Case 6: damaged checkpoint files (truncated `.distcp` / `common.pt` / `.metadata`, invalid
  `longctx_meta.json`, a marker naming a missing iteration, truncated safetensors) and a
  missing `--data-path` file: a `CheckpointError` / one line naming the file, never a bare
  EOFError traceback (the cross-tool table is tests/unit/test_corrupt_inputs.py).
* Case 7: `model.safetensors` written by the converter has the umask's mode, not 0600.
* Case 8: SIGUSR1 while the trainer is still importing -> exit 75 (requeue), no traceback, no
  checkpoint; the batch script's side is in tests/slurm/test_train_script.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_longctx.checkpoint.meta import (
    LATEST_NAME,
    META_NAME,
    CheckpointError,
    CheckpointNotFoundError,
)

REPO = Path(__file__).resolve().parents[2]
MOCK = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512"]
TINY_RUN = ["--model-preset", "tiny", "--seq-length", "64", "--max-position-embeddings", "64",
            "--micro-batch-size", "1", "--global-batch-size", "1", "--lr", "1e-4",
            "--transformer-impl", "local", *MOCK]


# --------------------------------------------------------------------------------------------
# fixtures and file damage, shared with tests/unit/test_corrupt_inputs.py
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A random HF LLaMA of `--model-preset tiny`'s shape (2 layers, hidden 64, GQA 4/2, vocab
    512) and its conversion to a checkpoint of ours (model only, iteration 0)."""
    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron
    from tests.unit.test_convert import make_hf

    root = tmp_path_factory.mktemp("fault-models")
    make_hf(root / "hf", vocab_size=512)
    convert_hf_to_megatron(root / "hf", root / "ours")
    return {"hf": root / "hf", "ours": root / "ours"}


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut `path` to `keep` of its size (a kill or a full disk during a copy)."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(int(size * keep))
    return path


def iteration_dir(root: Path) -> Path:
    return next(root.glob("iter_*"))


def largest_shard(root: Path) -> Path:
    return max(iteration_dir(root).glob("*.distcp"), key=lambda p: p.stat().st_size)


def damage_checkpoint(root: Path, kind: str) -> str:
    """Damage a copy of a checkpoint root in place; returns the file name the error must
    name."""
    directory = iteration_dir(root)
    if kind == "truncated-distcp":
        return truncate(largest_shard(root)).name
    if kind == "truncated-common":
        truncate(directory / "common.pt")
        return "common.pt"
    if kind == "truncated-metadata":
        truncate(directory / ".metadata")
        return ".metadata"
    if kind == "invalid-meta":
        meta = directory / META_NAME
        meta.write_text(meta.read_text()[:-40])  # an interrupted in-place edit
        return META_NAME
    if kind == "meta-unknown-field":
        meta = directory / META_NAME
        data = json.loads(meta.read_text())
        data["model"]["hiden_size"] = data["model"].pop("hidden_size")
        meta.write_text(json.dumps(data))
        return META_NAME
    if kind == "marker-missing-iteration":
        (root / LATEST_NAME).write_text("1000\n")
        return LATEST_NAME
    if kind == "marker-garbage":
        (root / LATEST_NAME).write_text("\x00\x00")
        return LATEST_NAME
    raise ValueError(kind)


CHECKPOINT_DAMAGE = ["truncated-distcp", "truncated-common", "truncated-metadata", "invalid-meta",
                     "meta-unknown-field", "marker-missing-iteration", "marker-garbage"]


def damage_hf(directory: Path, kind: str) -> str:
    """Damage a copy of an HF directory; returns what the error must name."""
    from safetensors.torch import load_file, save_file

    weights = directory / "model.safetensors"
    if kind == "missing-tensor":
        tensors = load_file(weights)
        del tensors["model.layers.0.mlp.up_proj.weight"]
        save_file(tensors, weights)
        return "missing tensor model.layers.0.mlp.up_proj.weight"
    if kind == "unexpected-tensor":
        import torch

        tensors = load_file(weights)
        tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
        save_file(tensors, weights)
        return "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"
    if kind == "gpt2":
        config = json.loads((directory / "config.json").read_text())
        config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        (directory / "config.json").write_text(json.dumps(config))
        return "model_type 'gpt2' is not supported"
    if kind == "truncated-safetensors":
        truncate(weights, 0.7)
        return "model.safetensors: truncated"
    raise ValueError(kind)


HF_DAMAGE = ["missing-tensor", "unexpected-tensor", "gpt2", "truncated-safetensors"]


def write_dataset(prefix: Path, documents: int = 4, length: int = 300) -> Path:
    """A small uint16 .bin/.idx pair (`documents` x `length` tokens)."""
    import numpy as np

    from megatron_longctx.data.indexed import index_bytes

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 500, size=documents * length).astype(np.uint16)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.bin").write_bytes(tokens.tobytes())
    lengths = np.full(documents, length, dtype=np.int32)
    pointers = np.arange(documents, dtype=np.int64) * length * 2
    Path(f"{prefix}.idx").write_bytes(index_bytes(np.uint16, lengths, pointers,
                                                  np.arange(documents + 1, dtype=np.int64)))
    return prefix


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return env


def _catches(pid: int, sig: int) -> bool:
    """True once process `pid` has a handler for `sig` (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines()
                if line.startswith("SigCgt:"))
    return bool(mask >> (sig - 1) & 1)


# --------------------------------------------------------------------------------------------
# case 8: a preemption signal during start-up
# --------------------------------------------------------------------------------------------
def test_usr1_while_trainer_imports_exits_for_requeue(tmp_path) -> None:
    """Before the fix the handler existed only once the loop ran (~6 s after start): a USR1
    during the imports killed the rank (exit 138, the job failed instead of requeueing)."""
    save = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "pretrain_longctx.py"), *TINY_RUN, "--train-iters", "3",
         "--exit-signal-handler", "--save", str(save), "--save-interval", "1"],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The handler is the entrypoint's first statement, torch's import (> 1.4 s here)
        # comes after it: signal as soon as it is installed, however slow the start.
        deadline = time.monotonic() + 60
        while not _catches(proc.pid, signal.SIGUSR1):
            assert time.monotonic() < deadline and proc.poll() is None, "no handler in 60 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 75, (proc.returncode, err[-2000:])
    assert "Traceback" not in err
    assert "signal before the first step" in out
    assert not (save / LATEST_NAME).exists()  # nothing trained, nothing saved


def test_usr1_without_exit_signal_handler_keeps_default(tmp_path) -> None:
    """Without --exit-signal-handler a recorded signal is delivered (Megatron-LM's behaviour:
    it ends the process), not swallowed."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "pretrain_longctx.py"), *TINY_RUN, "--train-iters", "3"],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 0.6
        while not _catches(proc.pid, signal.SIGUSR1) and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGUSR1)
        proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGUSR1


# --------------------------------------------------------------------------------------------
# case 6: damaged checkpoint files are named, before any tensor is read
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", CHECKPOINT_DAMAGE)
def test_damaged_checkpoint_is_named(tiny_models, tmp_path, kind) -> None:
    """Before: a bare EOFError / UnpicklingError / JSONDecodeError / TypeError traceback from
    deep inside torch.distributed.checkpoint or json, naming no file."""
    from megatron_longctx.checkpoint.integrity import open_checkpoint

    root = copy_tree(tiny_models["ours"], tmp_path / "ours")
    name = damage_checkpoint(root, kind)
    with pytest.raises(CheckpointError) as info:
        directory, meta = open_checkpoint(root)
        from megatron_longctx.checkpoint.meta import model_config_of

        model_config_of(meta, directory)
    message = str(info.value)
    assert name in message and "\n" not in message, message
    assert Path(info.value.path).name == name


def test_truncated_shard_fails_load_with_its_name(tiny_models, tmp_path) -> None:
    """The loader itself (not only open_checkpoint) refuses before dist_checkpointing reads."""
    from megatron_longctx.checkpoint.model_io import load_model_checkpoint, single_process_group
    from megatron_longctx.config.model import ParallelConfig
    from megatron_longctx.config.presets import get_preset
    from megatron_longctx.model.build import build_model

    root = copy_tree(tiny_models["ours"], tmp_path / "ours")
    shard = truncate(largest_shard(root))
    with single_process_group():
        model = build_model(get_preset("tiny"), ParallelConfig())
        with pytest.raises(CheckpointError, match=f"{shard.name}: truncated: "):
            load_model_checkpoint([model], root)


def test_missing_checkpoint_is_not_found(tmp_path) -> None:
    from megatron_longctx.checkpoint.integrity import open_checkpoint

    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        open_checkpoint(tmp_path / "empty")


def test_guarded_read_names_the_directory(tmp_path) -> None:
    from megatron_longctx.checkpoint.integrity import guarded_read

    expected = r"ckpt: cannot be loaded \(EOFError: no message"
    with pytest.raises(CheckpointError, match=expected), guarded_read(tmp_path / "ckpt"):
        raise EOFError


def test_trainer_names_a_missing_data_path(tmp_path, monkeypatch, capsys) -> None:
    """Before: FileNotFoundError traceback from build_datasets, after the process group."""
    from megatron_longctx.training import entry

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    argv = [a for a in TINY_RUN if a != "--mock-data"]
    code = entry.main([*argv, "--train-iters", "1", "--data-path", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'nope'}.idx" in err and "--data-path" in err
    assert len(err.strip().splitlines()) == 1
    prefix = write_dataset(tmp_path / "data" / "d_text_document")
    truncate(Path(f"{prefix}.bin"))
    code = entry.main([*argv, "--train-iters", "1", "--data-path", str(prefix)])
    err = capsys.readouterr().err
    assert code == 2 and f"{prefix}.bin: truncated" in err


# --------------------------------------------------------------------------------------------
# case 1: strict HF loading in evaluation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", HF_DAMAGE)
def test_eval_refuses_a_broken_hf_directory(tiny_models, tmp_path, kind) -> None:
    """Before: a missing tensor was filled with random weights and a gpt2 directory evaluated
    a random GPT-2, both with exit 0."""
    from megatron_longctx.eval.models import load_causal_lm

    hf = copy_tree(tiny_models["hf"], tmp_path / "hf")
    expected = damage_hf(hf, kind)
    with pytest.raises(ValueError) as info:
        load_causal_lm(hf)
    assert expected in str(info.value) and str(hf) in str(info.value)


def test_eval_loads_an_intact_hf_directory(tiny_models) -> None:
    from megatron_longctx.eval.models import load_causal_lm

    model = load_causal_lm(tiny_models["hf"])
    assert model.vocab_size == 512
    model.close()


def test_loading_info_backstop() -> None:
    from megatron_longctx.convert.hf_checks import check_loading_info
    from megatron_longctx.convert.hf_llama import ConversionError

    check_loading_info("d", {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []})
    with pytest.raises(ConversionError, match="d: missing tensor a.weight .and 1 more"):
        check_loading_info("d", {"missing_keys": ["b.weight", "a.weight"]})


# --------------------------------------------------------------------------------------------
# case 7: file modes
# --------------------------------------------------------------------------------------------
def test_converted_safetensors_have_the_umask_mode(tiny_models, tmp_path) -> None:
    """safetensors 0.8 writes 0600; the converter's output is shared like any other file."""
    from megatron_longctx.convert.hf_llama import convert_megatron_to_hf

    out = convert_megatron_to_hf(tiny_models["ours"], tmp_path / "hf-out",
                                 max_shard_size="100KB")
    umask = os.umask(0)
    os.umask(umask)
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 1
    for path in [*files, out / "config.json"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


# --------------------------------------------------------------------------------------------
# kill at a chosen file operation
# --------------------------------------------------------------------------------------------
KILL_AT = """
import os, runpy, sys
import megatron_longctx.checkpoint.model_io as model_io
model_io.write_latest = lambda *args, **kwargs: os._exit(137)  # killed before the marker
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_converter_killed_before_its_marker_leaves_no_output(tiny_models, tmp_path) -> None:
    """hf-to-megatron killed after every tensor file and longctx_meta.json were written but
    before the latest marker: --save does not exist (the work happens in a temporary sibling),
    and the same command then succeeds."""
    save = tmp_path / "out"
    argv = [str(REPO / "tools" / "convert_checkpoint.py"), "hf-to-megatron", "--hf-dir",
            str(tiny_models["hf"]), "--save", str(save), "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", KILL_AT, *argv], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert not save.exists()
    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron

    convert_hf_to_megatron(tiny_models["hf"], save)
    from megatron_longctx.checkpoint.integrity import open_checkpoint

    assert open_checkpoint(save)[1]["iteration"] == 0


@pytest.mark.parametrize("guard", [True, False])
def test_signal_after_the_loop_cannot_change_the_exit_code(guard) -> None:
    """A second copy of USR1 (the batch script resends it once) that lands after the loop has
    returned, here during interpreter shutdown, must leave exit 75 alone: with `ignore_late`
    it does; with only the recording handler, CPython's finalization restores the default
    action and a signal arriving then ends the process with 138 (-SIGUSR1)."""
    code = (
        "import os, signal, sys, atexit\n"
        "from megatron_longctx.training import signals\n"
        "signals.install_early()\n"
        + ("signals.ignore_late()\n" if guard else "")
        + "pid = os.getpid()\n"
        # Fork a child that signals the parent once the parent is finalizing (it closes
        # the pipe the child waits on at the very end).
        "r, w = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    os.close(w); os.read(r, 1); os.kill(pid, signal.SIGUSR1); os._exit(0)\n"
        "os.close(r)\n"
        "def late():\n"
        "    import time; time.sleep(0.3)\n"
        "class Closer:\n"
        "    def __del__(self):\n"
        "        os.close(w); late()\n"
        "sys.modules['__closer__'] = Closer()\n"
        "sys.exit(75)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=60)
    if guard:
        assert proc.returncode == 75, proc.stderr[-2000:]
    else:
        assert proc.returncode == -signal.SIGUSR1, (proc.returncode, proc.stderr[-2000:])
