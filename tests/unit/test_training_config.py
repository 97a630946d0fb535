"""pretrain_longctx.py flags -> PretrainConfig: Megatron names, presets, and every error naming
its flag before any process group exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longctx.config.training import (
    EXIT_REQUEUE,
    build_pretrain_parser,
    config_from_args,
    parse_pretrain_args,
)

ROOT = Path(__file__).resolve().parents[2]
MOCK = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512"]


def cfg_of(*argv: str, preset: str | None = "tiny"):
    args = list(argv)
    if preset:
        args = ["--model-preset", preset, *args]
    if "--train-iters" not in args:
        args += ["--train-iters", "3"]
    if not any(a in args for a in ("--mock-data", "--data-path", "--mixture-plan",
                                   "--data-args-path", "--per-split-data-args-path")):
        args += MOCK
    return config_from_args(build_pretrain_parser().parse_args(args))


def test_megatron_architecture_flags():
    cfg = cfg_of(
        "--num-layers", "4", "--hidden-size", "128", "--ffn-hidden-size", "352",
        "--num-attention-heads", "8", "--group-query-attention", "--num-query-groups", "2",
        "--normalization", "RMSNorm", "--swiglu", "--untie-embeddings-and-output-weights",
        "--disable-bias-linear", "--position-embedding-type", "rope", "--seq-length", "256",
        "--max-position-embeddings", "1024", "--rotary-base", "500000", preset=None)
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads) == \
        (4, 128, 352, 8)
    assert m.num_query_groups == 2 and m.untie_embeddings_and_output_weights
    assert (m.seq_length, m.max_position_embeddings, m.rotary_base) == (256, 1024, 500000)
    cfg.validate(world_size=1)


def test_preset_with_long_context_overrides():
    cfg = cfg_of("--seq-length", "8192", "--rotary-base", "5000000",
                 "--rotary-seq-len-interpolation-factor", "2", preset="llama2-7b")
    assert cfg.model.hidden_size == 4096 and cfg.model.seq_length == 8192
    assert cfg.model.max_position_embeddings == 8192  # raised to cover the sequence
    assert cfg.model.rotary_base == 5000000 and cfg.model.seq_len_interpolation_factor == 2


def test_parallel_training_and_checkpoint_flags():
    cfg = cfg_of("--num-layers", "4", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                 "--pipeline-model-parallel-size", "2",
                 "--num-layers-per-virtual-pipeline-stage", "1", "--context-parallel-size", "2",
                 "--cp-comm-type", "a2a", "--use-distributed-optimizer",
                 "--micro-batch-size", "1", "--global-batch-size", "8", "--lr", "2e-5",
                 "--min-lr", "1e-6", "--lr-warmup-iters", "10", "--lr-decay-style", "cosine",
                 "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "7",
                 "--log-interval", "5", "--eval-interval", "10", "--eval-iters", "2",
                 "--tensorboard-dir", "tb", "--save", "ck", "--load", "ck",
                 "--save-interval", "50", "--exit-signal-handler", "--exit-duration-in-mins",
                 "230", "--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1", "--seq-length", "64")
    p = cfg.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
            p.virtual_pipeline_model_parallel_size, p.context_parallel_size) == (2, 2, 2, 2)
    assert p.sequence_parallel and p.cp_comm_type == "a2a"
    assert cfg.optim.use_distributed_optimizer and cfg.optim.lr_decay_style == "cosine"
    assert cfg.training.exit_signal_handler and cfg.checkpoint.save_interval == 50
    cfg.validate(world_size=16)
    assert cfg.data_parallel_size(16) == 2 and cfg.num_microbatches(16) == 4


@pytest.mark.parametrize("argv,flag", [
    (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size"),
    (["--context-parallel-size", "2", "--seq-length", "66"], "--context-parallel-size"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "63"],
     "--sequence-parallel"),
    (["--global-batch-size", "3", "--micro-batch-size", "2"], "--global-batch-size"),
    (["--lr", "0"], "--lr"),
    (["--min-lr", "1", "--lr", "0.1"], "--min-lr"),
    (["--lr-decay-style", "exponential"], "--lr-decay-style"),
    (["--clip-grad", "-1"], "--clip-grad"),
    (["--recompute-granularity", "full"], "--recompute-method"),
    (["--recompute-method", "uniform", "--recompute-num-layers", "1"],
     "--recompute-granularity"),
    (["--on-nan-loss", "ignore"], "--on-nan-loss"),
    (["--save-interval", "10"], "--save"),
    (["--log-interval", "0"], "--log-interval"),
    (["--fp8-format", "hybrid", "--bf16"], "--fp8-format"),
    (["--fp8-dot-product-attention"], "--fp8-dot-product-attention"),
    (["--transformer-impl", "transformer_engine"], "--transformer-impl"),
    (["--attention-backend", "flash"], "--attention-backend"),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "3",
      "--micro-batch-size", "1"],
     "--pipeline-model-parallel-size"),
    (["--train-iters", "0"], "--train-iters"),
    (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins"),
])
def test_config_errors_name_the_flag(argv, flag):
    world = 4 if "--tensor-model-parallel-size" in argv and "3" in argv else 2
    cfg = cfg_of(*argv)
    with pytest.raises(ValueError, match=flag.replace("-", r"\-")):
        cfg.validate(world_size=world, te_available=False)


@pytest.mark.parametrize("argv,flag", [
    (["--normalization", "LayerNorm"], "--normalization"),
    (["--position-embedding-type", "learned_absolute"], "--position-embedding-type"),
    (["--num-query-groups", "2"], "--group-query-attention"),
    (["--num-layers-per-virtual-pipeline-stage", "3", "--pipeline-model-parallel-size", "2"],
     "--num-layers-per-virtual-pipeline-stage"),
    (["--bf16", "--fp16"], "--bf16"),
])
def test_translation_errors_name_the_flag(argv, flag):
    with pytest.raises(ValueError, match=flag.replace("-", r"\-")):
        cfg_of(*argv)


def test_data_source_errors():
    with pytest.raises(ValueError, match="exactly one data source"):
        cfg_of("--mock-data", "--data-path", "x", "--tokenizer-type", "NullTokenizer",
               "--vocab-size", "512").validate(world_size=1)
    with pytest.raises(ValueError, match="--tokenizer-model"):
        cfg_of("--data-path", "x").validate(world_size=1)
    with pytest.raises(ValueError, match="--vocab-size"):
        cfg_of("--mock-data", "--tokenizer-type", "NullTokenizer").validate(world_size=1)
    with pytest.raises(ValueError, match="--split"):
        cfg_of("--data-path", "x", "--tokenizer-model", "t", "--split", "a,b").validate(1)


def test_missing_data_files_name_their_flag(tmp_path):
    for flag in ("--mixture-plan", "--data-args-path", "--per-split-data-args-path"):
        cfg = cfg_of(flag, str(tmp_path / "absent.json"), "--tokenizer-model", "t")
        with pytest.raises(ValueError, match=f"{flag} .*absent.json: no such file"):
            cfg.validate(world_size=1)


def test_architecture_required_without_preset():
    with pytest.raises(ValueError, match="--model-preset"):
        cfg_of("--hidden-size", "64", preset=None)


def test_world_size_error_before_any_compute():
    """The CLI fails in its own process in about a second, naming the flags, exit code 2."""
    env = {"RANK": "0", "WORLD_SIZE": "3", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_longctx.py"), "--model-preset", "tiny",
         "--tensor-model-parallel-size", "2", "--train-iters", "1", *MOCK],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--tensor-model-parallel-size" in proc.stderr and "world size (3)" in proc.stderr


def test_usage_error_exit_code():
    with pytest.raises(SystemExit) as exc:
        parse_pretrain_args(["--model-preset", "tiny"])  # --train-iters missing
    assert exc.value.code == 2
    assert EXIT_REQUEUE == 75


def test_te_fp8_transformer_config_without_te():
    """The TransformerConfig for the H100 recipe (TE spec, FP8 hybrid, FP8 attention) is built
    and checked without TE: the fields the GPU run would get, and the spec choice."""
    from megatron_longctx.model.build import build_transformer_config
    from megatron_longctx.training.setup import transformer_overrides

    cfg = cfg_of("--bf16", "--transformer-impl", "transformer_engine", "--fp8-format",
                 "hybrid", "--fp8-recipe", "delayed", "--hidden-size", "256",
                 "--num-attention-heads", "2", "--fp8-amax-history-len", "1024",
                 "--fp8-amax-compute-algo", "max", "--fp8-dot-product-attention",
                 "--context-parallel-size", "2", "--cp-comm-type", "a2a",
                 "--attention-backend", "fused")
    cfg.validate(world_size=2, te_available=True)
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.precision, have_te=True,
                                  **transformer_overrides(cfg))
    assert tc.fp8 == "hybrid" and tc.fp8_recipe == "delayed"
    assert tc.fp8_amax_history_len == 1024 and tc.fp8_amax_compute_algo == "max"
    assert tc.fp8_dot_product_attention is True
    assert tc.transformer_impl == "transformer_engine" and tc.bf16
    assert tc.context_parallel_size == 2 and tc.cp_comm_type == "a2a"
    assert tc.attention_backend.name == "fused"
    assert tc.calculate_per_token_loss
    # Without TE the same flags are rejected before any compute, naming the flag.
    with pytest.raises(ValueError, match="--fp8-format"):
        cfg.validate(world_size=2, te_available=False)


def test_vpp_at_pp2_disables_batched_p2p():
    from megatron_longctx.training.setup import transformer_overrides

    cfg = cfg_of("--num-layers", "4", "--pipeline-model-parallel-size", "2",
                 "--num-layers-per-virtual-pipeline-stage", "1")
    assert transformer_overrides(cfg)["batch_p2p_comm"] is False
    assert transformer_overrides(cfg_of("--pipeline-model-parallel-size", "2"))[
        "batch_p2p_comm"] is True


# --- GPU defaults, GPU-only combinations, CUDA_DEVICE_MAX_CONNECTIONS ---------------
def test_gpu_performance_flags_parse():
    cfg = cfg_of("--context-parallel-size", "4", "--cp-comm-type", "a2a+p2p",
                 "--hierarchical-context-parallel-sizes", "2", "2", "--no-rope-fusion",
                 "--no-gradient-accumulation-fusion", "--no-overlap-grad-reduce")
    assert cfg.parallel.hierarchical_context_parallel_sizes == (2, 2)
    assert cfg.precision.apply_rope_fusion is False
    assert cfg.precision.gradient_accumulation_fusion is False
    assert cfg.parallel.overlap_grad_reduce is False
    cfg.validate(world_size=4)
    assert cfg_of("--overlap-grad-reduce").parallel.overlap_grad_reduce is True
    default = cfg_of()
    assert (default.precision.apply_rope_fusion, default.precision.gradient_accumulation_fusion,
            default.parallel.overlap_grad_reduce) == (None, None, None)  # auto


def test_gpu_performance_defaults_resolve_like_megatron():
    """Auto: fusions and overlap on with CUDA where the kernels exist, off on CPU."""
    from megatron_longctx.training.setup import performance_settings, transformer_overrides

    cfg = cfg_of()
    on = {"apply_rope_fusion": True, "gradient_accumulation_fusion": True,
          "overlap_grad_reduce": True}
    assert performance_settings(cfg, cuda=True, have_te=True, grad_fusion_kernel=True) == on
    assert performance_settings(cfg, cuda=False, have_te=False, grad_fusion_kernel=False) == {
        k: False for k in on}
    # CUDA without TE or apex: no fused RoPE, no fused accumulation, overlap still on.
    assert performance_settings(cfg, cuda=True, have_te=False, grad_fusion_kernel=False) == {
        "apply_rope_fusion": False, "gradient_accumulation_fusion": False,
        "overlap_grad_reduce": True}
    off = cfg_of("--no-rope-fusion", "--no-gradient-accumulation-fusion",
                 "--no-overlap-grad-reduce")
    assert performance_settings(off, cuda=True, have_te=True, grad_fusion_kernel=True) == {
        k: False for k in on}
    # On this CPU machine the trainer's TransformerConfig gets them off.
    overrides = transformer_overrides(cfg)
    assert overrides["apply_rope_fusion"] is False
    assert overrides["gradient_accumulation_fusion"] is False


TE_MASKED = ("--bf16", "--transformer-impl", "transformer_engine", "--reset-attention-mask")


@pytest.mark.parametrize(("comm", "version"), [("p2p", "2.7.0"), ("a2a", "2.10.0"),
                                               ("all_gather", "2.18.0+cu13")])
def test_document_masking_with_te_accepted_where_thd_is_supported(comm, version):
    cfg = cfg_of(*TE_MASKED, "--context-parallel-size", "2", "--cp-comm-type", comm)
    cfg.validate(world_size=2, te_available=True, te_version=version)
    # FP8 linear layers stay allowed.
    cfg_of(*TE_MASKED, "--fp8-format", "hybrid").validate(world_size=1, te_available=True,
                                                          te_version="2.10.0")
    cfg_of("--reset-attention-mask").validate(world_size=1)


@pytest.mark.parametrize(("flags", "version", "message"), [
    (("--cp-comm-type", "a2a"), "2.9.0",
     r"^--cp-comm-type a2a with --reset-attention-mask needs transformer-engine >= 2\.10 "),
    (("--cp-comm-type", "all_gather"), "2.17.1",
     r"^--cp-comm-type all_gather with --reset-attention-mask needs transformer-engine >= 2\.18"),
    (("--cp-comm-type", "p2p"), "2.6.0", r"^--cp-comm-type p2p with --reset-attention-mask"),
    (("--hierarchical-context-parallel-sizes", "2", "1", "--cp-comm-type", "a2a+p2p"), "2.18.0",
     r"^--cp-comm-type a2a\+p2p cannot be used with --reset-attention-mask"),
])
def test_document_masking_support_matrix_refusals(flags, version, message):
    cfg = cfg_of(*TE_MASKED, "--context-parallel-size", "2", *flags)
    with pytest.raises(ValueError, match=message) as err:
        cfg.validate(world_size=2, te_available=True, te_version=version)
    assert "\n" not in str(err.value)


def test_fp8_attention_with_document_masking_is_refused():
    cfg = cfg_of(*TE_MASKED, "--fp8-format", "hybrid", "--fp8-dot-product-attention",
                 preset="llama2-7b")
    with pytest.raises(ValueError, match="^--fp8-dot-product-attention cannot be used with "
                                         "--reset-attention-mask"):
        cfg.validate(world_size=1, te_available=True, te_version="2.18.0")


def test_reset_position_ids_and_pad_multiple_are_checked():
    with pytest.raises(ValueError, match="--reset-position-ids needs --reset-attention-mask"):
        cfg_of("--reset-position-ids").validate(world_size=1)
    cfg_of("--reset-attention-mask", "--reset-position-ids").validate(world_size=1)
    with pytest.raises(ValueError, match="--document-pad-multiple \\(6\\)"):
        cfg_of("--reset-attention-mask", "--context-parallel-size", "2",
               "--document-pad-multiple", "6").validate(world_size=2)
    with pytest.raises(ValueError, match="needs --micro-batch-size 1"):
        cfg_of("--reset-attention-mask", "--pipeline-model-parallel-size", "2",
               "--micro-batch-size", "2").validate(world_size=2)


def test_calculate_per_token_loss_flag():
    from megatron_longctx.training.setup import transformer_overrides

    assert cfg_of().training.per_token_loss()
    assert cfg_of("--calculate-per-token-loss").training.per_token_loss()
    off = cfg_of("--no-calculate-per-token-loss")
    assert not off.training.per_token_loss()
    assert transformer_overrides(off)["calculate_per_token_loss"] is False


def test_cuda_connections_set_before_any_cuda_call(monkeypatch):
    """initialize_distributed exports CUDA_DEVICE_MAX_CONNECTIONS=1 (TP/CP > 1) before
    torch.cuda.set_device creates the context; the driver reads it only then."""
    import torch

    from megatron_longctx.config.model import ParallelConfig
    from megatron_longctx.parallel import init

    seen = {}

    class StopError(Exception):
        pass

    def set_device(index):
        seen["value"] = init.os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
        raise StopError

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with pytest.raises(StopError):
        init.initialize_distributed(ParallelConfig(tensor_model_parallel_size=2),
                                    env={"RANK": "0", "WORLD_SIZE": "2"})
    assert seen["value"] == "1"


def test_entrypoint_sets_cuda_connections_before_importing_te(monkeypatch):
    """pretrain_longctx.py resolves the default --transformer-impl by importing TE, which
    can create the CUDA context: the variable must already be set by then."""
    from megatron_longctx.model import build
    from megatron_longctx.training import entry

    seen = []

    def te_available():
        seen.append(entry.os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"))
        return False

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    monkeypatch.setattr(build, "te_available", te_available)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    code = entry.main(["--model-preset", "tiny", "--context-parallel-size", "2",
                       "--train-iters", "1", *MOCK])
    assert code == 2  # world 1 cannot hold CP2: fails at validation, after the TE probe
    assert seen and all(v == "1" for v in seen)


@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
def test_grad_fusion_probe_needs_apex_kernel_for_both_specs(impl, monkeypatch):
    """GPTModel.output_layer is megatron's local ColumnParallelLinear under either spec, and
    its constructor raises with gradient_accumulation_fusion on and apex's kernel missing:
    with TE but no apex the probe must say no (it said yes for the TE spec)."""
    import sys
    import types

    import torch
    from megatron.core.tensor_parallel import layers

    from megatron_longctx.training.setup import grad_accum_fusion_kernel_available

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", None)  # import fails
    assert grad_accum_fusion_kernel_available(impl) is False
    # megatron's own answer on this machine (no apex) is the same.
    assert layers._grad_accum_fusion_available is False
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda",
                        types.ModuleType("fused_weight_gradient_mlp_cuda"))
    assert grad_accum_fusion_kernel_available(impl) is True
