"""The optional log series (TensorBoard and W&B), the profiler window and --manual-gc, on the
real trainer (TP2, two gloo ranks).

Pinned to outside references: the parameter norm to the norm of the saved full (TP1) weights,
validation perplexity to exp(loss), the W&B history to TensorBoard's values (read back with
wandb's own run-file reader, `wandb.sdk.internal.datastore.DataStore`), the trace to
torch.profiler's own trace validator.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pytest

from megatron_longctx.training import metrics
from tests.distributed.spawn import run_distributed
from tests.distributed.trainer_harness import _train_rank, final_weights, make_config

NEW_SERIES = [
    metrics.TAG_THROUGHPUT, "mem-rss-bytes", "mem-max-rss-bytes",
    *metrics.TIMER_TAGS.values(), metrics.TAG_PARAMS_NORM, metrics.TAG_NUM_ZEROS,
    metrics.TAG_VALID_LOSS, metrics.TAG_VALID_PPL,
]


def read_tensorboard(log_dir: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def read_wandb_history(save_dir: str) -> list[dict]:
    """History rows of the one offline run under `save_dir`, via wandb's reader."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    (run_file,) = Path(save_dir).glob("wandb/offline-run-*/run-*.wandb")
    store = datastore.DataStore()
    store.open_for_scan(str(run_file))
    rows = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def _logging_rank(rank: int, world: int, cfg):
    import os

    from megatron_longctx.training import loop

    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    original, gc_during_steps = loop.train_step, []

    def step(*args, **kwargs):
        gc_during_steps.append(gc.isenabled())
        return original(*args, **kwargs)

    loop.train_step = step
    result = _train_rank(rank, world, cfg)
    result["gc_during_steps"] = gc_during_steps
    result["gc_enabled_after"] = gc.isenabled()
    return result


@pytest.fixture(scope="module")
def logged_run(init_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("logged")
    cfg = make_config(load=init_ckpt, save=str(root / "ckpt"), iters=4, tp=2,
                      save_interval=2, eval_interval=2, eval_iters=1, manual_gc=True,
                      manual_gc_interval=2)
    lg = cfg.logging
    lg.tensorboard_dir = str(root / "tb")
    lg.log_throughput = lg.log_memory_to_tensorboard = lg.log_timers_to_tensorboard = True
    lg.log_params_norm = lg.log_num_zeros_in_grad = True
    lg.wandb_project, lg.wandb_exp_name = "longctx-test", "logged"
    lg.wandb_save_dir = str(root)
    results = run_distributed(_logging_rank, 2, cfg, timeout=300.0)
    return root, results


def test_every_new_series_is_in_tensorboard(logged_run):
    root, _ = logged_run
    scalars = read_tensorboard(str(root / "tb"))
    missing = [tag for tag in NEW_SERIES if tag not in scalars]
    assert not missing, missing
    assert sorted(scalars[metrics.TAG_VALID_LOSS]) == [2, 4]
    for step, loss in scalars[metrics.TAG_VALID_LOSS].items():
        assert scalars[metrics.TAG_VALID_PPL][step] == pytest.approx(math.exp(loss), rel=1e-6)
    assert sorted(scalars["save-checkpoint-time"]) == [2, 4]
    assert all(v > 0 for v in scalars["mem-rss-bytes"].values())
    assert all(v > 0 for v in scalars["optimizer-time"].values())
    # Tokens that no sequence of the batch contains have all-zero embedding gradients.
    zeros = scalars[metrics.TAG_NUM_ZEROS]
    assert all(v > 0 and v == int(v) for v in zeros.values())


def test_params_norm_matches_the_saved_full_model(logged_run):
    """TP2's norm (duplicates counted once, shards summed over TP) equals the L2 norm of the
    saved weights gathered into one TP1 model."""
    import torch

    root, _ = logged_run
    weights = final_weights(str(root / "ckpt"))
    reference = math.sqrt(sum(float(w.double().pow(2).sum()) for w in weights.values()
                              if w.is_floating_point()))
    logged = read_tensorboard(str(root / "tb"))[metrics.TAG_PARAMS_NORM][4]
    assert logged == pytest.approx(reference, rel=1e-6)
    assert torch.isfinite(torch.tensor(logged))


def test_wandb_offline_history_matches_tensorboard(logged_run):
    root, _ = logged_run
    scalars = read_tensorboard(str(root / "tb"))
    rows = read_wandb_history(str(root))
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["_step"], {}).update(row)
    for tag in (metrics.TAG_LM_LOSS, metrics.TAG_PARAMS_NORM, metrics.TAG_VALID_LOSS):
        tb = scalars[tag]
        wb = {step: row[tag] for step, row in by_step.items() if tag in row}
        assert sorted(wb) == sorted(tb), tag
        for step, value in tb.items():  # TensorBoard stores float32
            assert wb[step] == pytest.approx(value, rel=1e-6), (tag, step)


def test_manual_gc_disables_automatic_collection_during_the_run(logged_run):
    _, results = logged_run
    assert all(r["gc_during_steps"] == [False] * 4 for r in results)
    assert all(r["gc_enabled_after"] for r in results)  # restored at the end


def test_wandb_without_package_fails_in_one_line(monkeypatch, capsys):
    import importlib.util

    from megatron_longctx.training import entry

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    code = entry.main(["--model-preset", "tiny", "--train-iters", "1", "--mock-data",
                       "--tokenizer-type", "NullTokenizer", "--vocab-size", "512",
                       "--wandb-project", "p"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--wandb-project" in err[0] and "wandb" in err[0]


def _profiled_rank(rank: int, world: int, cfg):
    import torch

    from megatron_longctx.training import loop

    original = loop.train_step
    profiling = []

    def step(*args, **kwargs):
        profiling.append(torch.autograd.profiler._is_profiler_enabled)
        return original(*args, **kwargs)

    loop.train_step = step
    result = _train_rank(rank, world, cfg)
    result["profiling"] = profiling
    return result


def test_profiler_traces_the_window_on_rank_0_only(init_ckpt, tmp_path):
    from torch.profiler._trace_validator import _load_events, validate_trace

    cfg = make_config(load=init_ckpt, iters=6, distopt=True)
    lg = cfg.logging
    lg.profile = lg.use_pytorch_profiler = True
    lg.profile_step_start, lg.profile_step_end = 3, 5
    lg.tensorboard_dir = str(tmp_path / "tb")
    results = run_distributed(_profiled_rank, 2, cfg, timeout=240.0)
    traces = sorted((tmp_path / "tb").glob("*.pt.trace.json"))
    assert [t.name.split(".")[0] for t in traces] == ["rank0"]
    ok, violations = validate_trace(str(traces[0]))
    assert ok, violations
    names = {e.get("name") for e in _load_events(str(traces[0]))}
    assert {n for n in names if n and n.startswith("iteration-")} == {"iteration-3",
                                                                       "iteration-4"}
    # Steps outside the window run without the profiler (rank 1: never).
    assert results[0]["profiling"] == [False, False, False, True, True, False]
    assert results[1]["profiling"] == [False] * 6
