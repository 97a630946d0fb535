"""Run the real trainer (`training.loop.pretrain`) in forked gloo ranks for equivalence tests.

Every run starts from the same model-only checkpoint (`make_init_checkpoint`, TP1 in one
process), so layouts whose initialisation would differ (pipeline stages seed differently) start
from identical weights; this also exercises model-only resharded loading. The checkpoint is
initialised with INIT_SEED, not the trainer's seed: a run that ignored the loaded weights and
kept its own random initialisation (the bf16 optimizer's stale fp32 main copies did) would
otherwise train from the very same numbers and pass unnoticed. Final weights are
compared by loading each run's last checkpoint into one TP1 process.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

from megatron_longctx.config.model import ParallelConfig, PrecisionConfig
from megatron_longctx.config.presets import get_preset
from megatron_longctx.config.training import (
    CheckpointConfig,
    DataConfig,
    OptimConfig,
    PretrainConfig,
    TrainingConfig,
)
from tests.distributed.spawn import run_distributed

SEQ = 64
#: Seed of the initial checkpoint; differs from TrainingConfig.seed (1234) on purpose.
INIT_SEED = 4321
#: Layout comparisons against one process: fp32 exact to 1e-5; bf16 losses within 5e-4 and
#: weights within 2 lr-sized steps per step over 3 steps.
TOL = 1e-5
BF16_LOSS_TOL = 5e-4
BF16_WEIGHT_ATOL = 2 * 1e-4 * 3


def tiny_model(num_layers: int = 4):
    return dataclasses.replace(get_preset("tiny"), num_layers=num_layers, seq_length=SEQ,
                               max_position_embeddings=SEQ, pad_vocab=True)


def make_config(*, tp: int = 1, pp: int = 1, cp: int = 1, vpp: int | None = None,
                sp: bool = False, distopt: bool = False, mbs: int = 2, gbs: int = 4,
                iters: int = 3, load: str | None = None, save: str | None = None,
                exit_interval: int | None = None, masking: bool = False,
                lr: float = 1e-4, save_interval: int | None = None,
                dtype: str = "fp32", no_load_optim: bool = False, finetune: bool = False,
                overlap: bool | None = None, eod_mask_loss: bool = False,
                pad_multiple: int | None = 4,
                **training: Any) -> PretrainConfig:
    """`pad_multiple`: documents padded to it when masking (4 = 2 x CP2, so one process runs
    the very batches CP2 splits)."""
    return PretrainConfig(
        model=tiny_model(),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                context_parallel_size=cp,
                                virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sp,
                                overlap_grad_reduce=overlap),
        data=DataConfig(mock_data=True, tokenizer_type="NullTokenizer", vocab_size=512,
                        reset_attention_mask=masking, eod_mask_loss=eod_mask_loss,
                        document_pad_multiple=pad_multiple if masking else None),
        optim=OptimConfig(lr=lr, weight_decay=0.01, clip_grad=1.0,
                          use_distributed_optimizer=distopt),
        training=TrainingConfig(micro_batch_size=mbs, global_batch_size=gbs, train_iters=iters,
                                exit_interval=exit_interval, **training),
        checkpoint=CheckpointConfig(load=load, save=save, save_interval=save_interval,
                                    no_load_optim=no_load_optim, finetune=finetune),
        precision=PrecisionConfig(params_dtype=dtype),
    )


def _train_rank(rank: int, world: int, cfg: PretrainConfig) -> dict[str, Any]:
    from megatron_longctx.parallel.init import initialize_model_parallel, set_seed
    from megatron_longctx.training.loop import pretrain

    cfg.validate(world)
    initialize_model_parallel(cfg.parallel)
    set_seed(cfg.training.seed)
    result = pretrain(cfg)
    return {"losses": result.losses, "exit_code": result.exit_code,
            "iteration": result.state.iteration, "grad_norms": result.grad_norms,
            "reason": result.reason}


def train(cfg: PretrainConfig, world: int) -> dict[str, Any]:
    """Run the trainer on `world` ranks; the last rank's result (all ranks agree on losses)."""
    results = run_distributed(_train_rank, world, cfg, timeout=240.0)
    losses = {tuple(r["losses"]) for r in results}
    assert len(losses) == 1, f"ranks disagree on losses: {losses}"
    return results[-1]


def _init_rank(rank: int, world: int, root: str) -> None:
    from megatron_longctx.checkpoint.model_io import save_model_checkpoint
    from megatron_longctx.model.build import build_model_chunks
    from megatron_longctx.parallel.init import initialize_model_parallel, set_seed

    parallel = ParallelConfig()
    initialize_model_parallel(parallel)
    set_seed(INIT_SEED)
    chunks = build_model_chunks(tiny_model(), parallel)
    save_model_checkpoint(chunks, root, 0, tiny_model(), parallel, source="tests")


def make_init_checkpoint(root: Path) -> str:
    run_distributed(_init_rank, 1, str(root))
    return str(root)


def _weights_rank(rank: int, world: int, path: str) -> dict[str, Any]:
    from megatron_longctx.checkpoint.model_io import load_model_checkpoint
    from megatron_longctx.model.build import build_model_chunks
    from megatron_longctx.parallel.init import initialize_model_parallel, set_seed

    parallel = ParallelConfig()
    initialize_model_parallel(parallel)
    set_seed(1234)
    (model,) = build_model_chunks(tiny_model(), parallel)
    load_model_checkpoint([model], path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}


def final_weights(path: str) -> dict[str, Any]:
    """Full (TP1) weights of the latest checkpoint under `path`."""
    return run_distributed(_weights_rank, 1, path)[0]


def max_bf16_excess(a: dict[str, Any], b: dict[str, Any], ulps: float = 2.0) -> float:
    """Largest elementwise |a - b| beyond `ulps` bf16 spacings of b (0.0 when all within).

    bf16 weights compare in units of their own spacing (2^-7 relative): a fixed absolute
    tolerance is below bf16 resolution at the norm weights (1.0 has ulp 7.8e-3) and far above
    it at small projection weights. What remains beyond the ulps is compared against the
    optimizer's step size: Adam normalises each gradient, so an element whose gradient is
    rounding noise may step +lr in one layout and -lr in another (2 lr per step)."""
    import torch

    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        ref = b[key].float()
        _, exponent = torch.frexp(ref)
        ulp = torch.ldexp(torch.ones_like(ref), exponent - 8)
        excess = (a[key].float() - ref).abs() - ulps * ulp
        worst = max(worst, float(excess.max()))
    return max(worst, 0.0)


def assert_moved_only_by_updates(loaded: dict[str, Any], trained: dict[str, Any], *,
                                 iters: int, lr: float, dtype: str) -> float:
    """Every trained weight lies within `iters` Adam updates of its loaded value, plus (bf16)
    one ulp of rounding of the stored weight; returns the largest change (> 0 expected).

    Adam's per-element update is lr * m_hat / (sqrt(v_hat) + eps): exactly <= lr at step 1 and
    a small multiple of it in the first few steps (bound used: 3 lr per step; weight decay adds
    lr * wd * |w|, negligible here). A run that kept a stale copy of other weights (the bf16
    optimizer's fp32 main parameters from the random init) moves them by ~0.1."""
    import torch

    assert loaded.keys() == trained.keys()
    moved = 0.0
    for key, start in loaded.items():
        start = start.float()
        delta = (trained[key].float() - start).abs()
        bound = torch.full_like(start, iters * lr * 3.0)
        if dtype != "fp32":
            _, exponent = torch.frexp(start)
            bound = bound + torch.ldexp(torch.ones_like(start), exponent - 8)
        assert bool((delta <= bound).all()), (key, float(delta.max()))
        moved = max(moved, float(delta.max()))
    return moved


def max_weight_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def convert_random_hf_tp2(root: Path, vocab_size: int, **hf_changes: Any) -> str:
    """A random HF LLaMA of the harness's tiny shape (4 layers, hidden 64, GQA 4/2, SwiGLU 176;
    `hf_changes` to its config) with `vocab_size` tokens, written under `root / "hf"` and
    converted by the real tool to a TP2 model-only checkpoint at `root / "converted"`."""
    from tests.unit.test_convert import make_hf

    make_hf(root / "hf", num_hidden_layers=4, vocab_size=vocab_size, **hf_changes)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(repo / "tools" / "convert_checkpoint.py"), "hf-to-megatron",
         "--hf-dir", str(root / "hf"), "--save", str(root / "converted"),
         "--tensor-model-parallel-size", "2"],
        capture_output=True, text=True, cwd=repo, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return str(root / "converted")
