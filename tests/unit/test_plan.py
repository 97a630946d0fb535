"""The layout planner: model state against outside counts, the search's acceptance case, and
`pretrain_longctx.py --dry-run`. Measured agreement with the trainer's peaks is
benchmarks/bench_plan_memory.py (docs/slurm.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_longctx.config.presets import get_preset
from megatron_longctx.plan.memory import Layout, estimate_memory, model_state, with_sequence
from megatron_longctx.plan.search import estimate_time, search_layouts

REPO = Path(__file__).resolve().parents[2]
# Parameter counts of the released HF checkpoints (sum of tensor sizes of model.safetensors).
HF_PARAMS = {"llama2-7b": 6_738_415_616, "llama3-8b": 8_030_261_248}


@pytest.mark.parametrize("name", sorted(HF_PARAMS))
def test_parameters_match_the_hf_release(name):
    model = get_preset(name)  # unpadded vocabulary: 32000 and 128256 are multiples of 128
    state = model_state(model, Layout(dtype="bf16"))
    assert state.parameters == HF_PARAMS[name]
    assert state.weights == 2 * HF_PARAMS[name]
    assert state.gradients == 4 * HF_PARAMS[name]


def test_tp_and_pp_split_the_parameters_exactly():
    model = get_preset("llama2-7b")
    whole = model_state(model, Layout(dtype="bf16")).parameters
    h = model.hidden_size
    norms = (2 * model.num_layers + 1) * h  # replicated over TP
    tp4 = model_state(model, Layout(dtype="bf16", tp=4)).parameters
    assert tp4 == (whole - norms) // 4 + norms
    pp = Layout(dtype="bf16", pp=4)
    stages = [model_state(model, pp, s).parameters for s in range(4)]
    assert sum(stages) == whole


def test_distributed_optimizer_shards_over_dp_times_cp():
    """megatron-core shards Adam state over the data-parallel group including CP: 12 B per
    parameter / (DP x CP) with bf16 (fp32 main copy + 2 moments), padding aside."""
    model = get_preset("llama2-7b")
    n = HF_PARAMS["llama2-7b"]
    plain = model_state(model, Layout(dtype="bf16")).optimizer
    assert plain == 12 * n + 4 * (32 * 6 + 3)  # + torch Adam's 4-byte step per parameter tensor
    sharded = model_state(model, Layout(dtype="bf16", dp=2, cp=4,
                                        distributed_optimizer=True)).optimizer
    assert sharded == pytest.approx(12 * n / 8, rel=1e-3)


def test_recompute_and_cp_reduce_activations():
    model = with_sequence(get_preset("llama2-7b"), 32768)
    base = Layout(dtype="bf16", tp=2, sequence_parallel=True, distributed_optimizer=True)
    none = estimate_memory(model, base).activation_bytes
    full = estimate_memory(model, replace(base, recompute_granularity="full",
                                          recompute_method="uniform",
                                          recompute_num_layers=1)).activation_bytes
    cp2 = estimate_memory(model, replace(base, cp=2)).activation_bytes
    assert full < none / 8
    assert cp2 == pytest.approx(none / 2, rel=0.05)


def test_stock_loss_holds_the_logits():
    model = with_sequence(get_preset("llama3-8b"), 32768)
    lay = Layout(dtype="bf16", tp=1, recompute_granularity="full", recompute_method="uniform",
                 recompute_num_layers=1)
    stock = estimate_memory(model, replace(lay, cross_entropy_impl="megatron"))
    chunked = estimate_memory(model, lay)
    # bf16 logits + their fp32 softmax: 6 B x 32768 tokens x 128,256 rows = 25.2 GB
    assert stock.activations["logits (stock loss)"] >= 6 * 32768 * 128256
    assert "logits (stock loss)" not in chunked.activations
    assert stock.activation_bytes - chunked.activation_bytes > 20e9


def test_search_llama3_8b_128k_on_one_node():
    """The acceptance case: layouts under 80 GB exist; TP1 x CP1 does not fit."""
    model = with_sequence(get_preset("llama3-8b"), 131072)
    cands = search_layouts(model, gpus_per_node=8, nodes=1, gpu_memory_gb=80)
    fit = [c for c in cands if c.fits]
    assert fit and all(c.memory.total_bytes <= 80e9 for c in fit)
    assert not any(c.fits for c in cands if c.layout.tp == 1 and c.layout.cp == 1)
    assert fit[0].time.step_s <= fit[-1].time.step_s


def test_time_uses_the_trainers_flops():
    """LLaMA-2 7B at 128K: 142.7 GFLOP/token (training/metrics.py's causal count)."""
    model = with_sequence(get_preset("llama2-7b"), 131072)
    t = estimate_time(model, Layout(dtype="bf16", tp=4, cp=4, dp=8, num_microbatches=4),
                      mfu=0.327)
    assert t.flops_per_token == pytest.approx(142.7e9, rel=1e-3)
    # 2,260 tokens/s/GPU is the NeMo anchor the default MFU comes from
    assert t.tokens_per_gpu_s == pytest.approx(2260, rel=0.02)


def _dry_run(*flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, str(REPO / "pretrain_longctx.py"), "--dry-run", "--mock-data",
         "--tokenizer-type", "NullTokenizer", "--train-iters", "1", *flags],
        env=env, capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_estimate_and_exits_0():
    proc = _dry_run("--model-preset", "tiny", "--vocab-size", "512", "--seq-length", "2048",
                    "--transformer-impl", "local")
    assert proc.returncode == 0, proc.stderr
    assert "optimizer state" in proc.stdout and "fits in 80 GB" in proc.stdout


def test_dry_run_over_memory_exits_4_with_layouts_that_fit():
    proc = _dry_run("--model-preset", "llama3-8b", "--vocab-size", "128256", "--seq-length",
                    "131072", "--bf16", "--transformer-impl", "transformer_engine",
                    "--plan-world-size", "8", "--use-distributed-optimizer")
    assert proc.returncode == 4, proc.stderr
    assert "DOES NOT FIT" in proc.stdout and "--recompute-granularity full" in proc.stdout


def test_activation_offloading_flags_are_checked_and_counted():
    from megatron_longctx.config.training import parse_pretrain_args
    from megatron_longctx.plan.inputs import layout_from_config

    base = ["--model-preset", "llama2-7b", "--seq-length", "32768", "--mock-data",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "32000", "--train-iters", "1",
            "--bf16"]
    cfg = parse_pretrain_args([*base, "--fine-grained-activation-offloading",
                               "--offload-modules", "core_attn", "attn_proj"])
    cfg.training.validate()
    with_offload = layout_from_config(cfg, 1)
    assert with_offload.offload_modules == ("core_attn", "attn_proj")
    plain = layout_from_config(parse_pretrain_args(base), 1)
    model = with_sequence(get_preset("llama2-7b"), 32768)
    assert (estimate_memory(model, with_offload).activation_bytes
            < estimate_memory(model, plain).activation_bytes)
    bad = parse_pretrain_args([*base, "--fine-grained-activation-offloading",
                               "--offload-modules", "attn_proj"])
    with pytest.raises(ValueError, match="--offload-modules attn_proj needs core_attn"):
        bad.training.validate()


def test_tool_reads_an_hf_config_dir_and_searches(tmp_path, capsys):
    """tools/plan_layout.py: the model from an HF config.json equals the preset's; --search
    prints ranked layouts and the flags of the best; exit 0."""
    import json

    sys.path.insert(0, str(REPO / "tools"))
    import plan_layout

    from megatron_longctx.convert.hf_llama import hf_config_from_model

    (tmp_path / "config.json").write_text(json.dumps(
        hf_config_from_model(get_preset("llama3-8b"), "bf16")))
    assert plan_layout.main(["--hf-config", str(tmp_path), "--seq-length", "65536",
                             "--tp", "2", "--cp", "4", "--recompute", "block:12"]) == 0
    from_hf = capsys.readouterr().out
    assert plan_layout.main(["--model-preset", "llama3-8b", "--seq-length", "65536",
                             "--tp", "2", "--cp", "4", "--recompute", "block:12"]) == 0
    from_preset = capsys.readouterr().out
    assert from_hf == from_preset and "fits in 80 GB" in from_hf
    assert plan_layout.main(["--model-preset", "llama2-7b", "--seq-length", "65536",
                             "--search"]) == 0
    out = capsys.readouterr().out
    assert "best: --tensor-model-parallel-size" in out and "rejected (over memory)" in out
    assert plan_layout.main(["--seq-length", "1024"]) == 2
