"""Step time of a layout, the layouts that fit a cluster, and the report that explains both.

Time: FLOPs per step are the trainer's own count (`training.metrics.flops_per_token`, causal,
as the trainer logs TFLOP/s) x tokens per step; a step takes FLOPs / (GPUs x MFU x peak). The
default MFU is the published anchor: NeMo's LLaMA-2 7B at 128K on 128 H100s (TP4 CP4 DP8,
FP8) reports 555 TFLOP/s/GPU by its non-causal count, i.e. 2,260 tokens/s/GPU, which is
323 TFLOP/s by our causal count: MFU 0.327 of the 989 TFLOP/s BF16 dense peak. Layouts are
ranked by that time adjusted for what differs between them, to first order: the pipeline
bubble ((PP - 1) / (VPP x micro-batches)), recompute (a fully recomputed layer runs its forward
again: +1/3 of its FLOPs; selective recompute re-runs core attention's forward: +1/3 of the
attention FLOPs) and TP beyond one node (x2 time on its GEMMs' communication; never chosen).
These are relative, not calibrated: a measured MFU for the chosen layout replaces the anchor.

Search: TP in powers of two dividing heads, query groups and the node, CP in powers of two with
seq % (2 x CP x TP) == 0, PP dividing the layers (VPP 1 or 2), DP what the world leaves,
recompute none / selective / full block N (the fewest N that fits) / full uniform 1, micro-batch
1; the distributed optimizer and sequence parallelism (TP > 1) always on, Transformer Engine
with the chunked loss (the recipe's settings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from megatron_longctx.config.model import ModelConfig
from megatron_longctx.plan.memory import GIB, Layout, MemoryEstimate, estimate_memory

#: BF16 dense peak of an H100 SXM (TFLOP/s), the default device.
H100_BF16_TFLOPS = 989.0
#: NeMo LLaMA-2 7B 128K on H100: 2,260 tokens/s/GPU = 323 TFLOP/s causal = MFU 0.327.
DEFAULT_MFU = 0.327
MFU_SOURCE = ("NeMo LLaMA-2 7B, 128K, 128 H100 (TP4 CP4 DP8, FP8): 555 TFLOP/s/GPU non-causal "
              "= 2,260 tokens/s/GPU = 323 TFLOP/s causal = 0.327 of 989 TFLOP/s BF16 peak")


@dataclass
class TimeEstimate:
    """Step time and throughput of a layout at an assumed MFU."""

    flops_per_token: float
    tokens_per_step: int
    step_s: float
    tokens_per_gpu_s: float
    days: float | None
    slowdown: float  # bubble x recompute x communication factor against the ideal
    mfu: float


def padded_model(model: ModelConfig, tp: int) -> ModelConfig:
    """The model with the vocabulary the trainer builds at this TP (for FLOPs)."""
    return replace(model, vocab_size=model.padded_vocab(tp), padded_vocab_rows=None,
                   pad_vocab=False)


def estimate_time(model: ModelConfig, layout: Layout, *, mfu: float = DEFAULT_MFU,
                  peak_tflops: float = H100_BF16_TFLOPS, token_budget: float | None = None,
                  gpus_per_node: int = 8) -> TimeEstimate:
    """Step time from the trainer's FLOPs count at `mfu`, adjusted for the layout."""
    from megatron_longctx.training.metrics import attention_flops_per_token, flops_per_token

    m = padded_model(model, layout.tp)
    fpt = flops_per_token(m, model.seq_length)
    attn = attention_flops_per_token(m, model.seq_length)
    tokens = layout.micro_batch_size * layout.num_microbatches * layout.dp * model.seq_length
    slowdown = 1.0
    if layout.pp > 1:
        slowdown *= 1 + (layout.pp - 1) / (layout.vpp * layout.num_microbatches)
    layer_flops = fpt - 6.0 * model.hidden_size * m.vocab_size
    if layout.recompute_granularity == "full":
        n = layout.recompute_num_layers or 1
        per_stage = model.num_layers // layout.pp
        share = 1.0 if layout.recompute_method != "block" else min(n * layout.vpp,
                                                                     per_stage) / per_stage
        slowdown *= 1 + share * layer_flops / 3 / fpt
    elif layout.recompute_granularity == "selective":
        slowdown *= 1 + attn / 3 / fpt
    if layout.tp > gpus_per_node:
        slowdown *= 2.0
    step = fpt * tokens / (layout.world_size * mfu * peak_tflops * 1e12) * slowdown
    per_gpu = tokens / step / layout.world_size
    days = None if token_budget is None else token_budget / (per_gpu * layout.world_size) / 86400
    return TimeEstimate(flops_per_token=fpt, tokens_per_step=tokens, step_s=step,
                        tokens_per_gpu_s=per_gpu, days=days, slowdown=slowdown, mfu=mfu)


@dataclass
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    time: TimeEstimate
    fits: bool


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


def search_layouts(model: ModelConfig, *, gpus_per_node: int = 8, nodes: int = 1,
                   gpu_memory_gb: float = 80.0, global_batch_tokens: int = 4 * 1024 * 1024,
                   mfu: float = DEFAULT_MFU, token_budget: float | None = None,
                   base: Layout | None = None, max_tp: int | None = None) -> list[Candidate]:
    """Every layout of the search space with its estimates, fitting ones first by step time.

    Args:
        model: the model at its training `seq_length`.
        gpus_per_node / nodes: the cluster.
        gpu_memory_gb: usable memory per GPU in GB (10^9 bytes, as GPUs are sold: 80 for H100).
        global_batch_tokens: tokens per optimizer step (the paper: 4M); the global batch is
            this / seq_length sequences (at least DP).
        mfu / token_budget: for the time estimate.
        base: settings kept from a run (precision, implementation, loss); default the recipe's
            (bf16, Transformer Engine, chunked loss, distributed optimizer).
        max_tp: largest TP tried (default: GPUs per node).
    """
    world = gpus_per_node * nodes
    limit = gpu_memory_gb * 1e9
    base = base or Layout(dtype="bf16", impl="transformer_engine", distributed_optimizer=True)
    seq = model.seq_length
    out: list[Candidate] = []
    for tp in _powers_of_two(min(max_tp or gpus_per_node, gpus_per_node)):
        if model.num_attention_heads % tp or model.query_groups % tp or model.ffn_hidden_size % tp:
            continue
        for cp in _powers_of_two(world // tp):
            if seq % (2 * cp * tp if cp > 1 else tp):
                continue
            for pp in _powers_of_two(world // (tp * cp)):
                if model.num_layers % pp:
                    continue
                dp = world // (tp * cp * pp)
                gbs = max(dp, global_batch_tokens // seq)
                gbs -= gbs % dp
                micro = gbs // dp
                for vpp in ([1, 2] if pp > 1 else [1]):
                    if model.num_layers % (pp * vpp) or (vpp > 1 and micro % pp):
                        continue
                    layout = replace(base, tp=tp, cp=cp, pp=pp, vpp=vpp, dp=dp,
                                     micro_batch_size=1, num_microbatches=micro,
                                     sequence_parallel=tp > 1)
                    out.extend(_recompute_choices(model, layout, limit, mfu, token_budget,
                                                  gpus_per_node))
    out.sort(key=lambda c: (not c.fits, c.time.step_s if c.fits else c.memory.total_bytes))
    return out


def _candidate(model: ModelConfig, layout: Layout, limit: float, mfu: float,
               budget: float | None, gpn: int) -> Candidate:
    mem = estimate_memory(model, layout)
    return Candidate(layout, mem, estimate_time(model, layout, mfu=mfu, token_budget=budget,
                                                gpus_per_node=gpn), mem.total_bytes <= limit)


def _recompute_choices(model: ModelConfig, layout: Layout, limit: float, mfu: float,
                       budget: float | None, gpn: int) -> list[Candidate]:
    """No recompute, selective, and full block with the fewest layers N that fits (else full
    uniform 1): one candidate each."""
    out = [_candidate(model, replace(layout, recompute_granularity=None), limit, mfu, budget,
                      gpn),
           _candidate(model, replace(layout, recompute_granularity="selective"), limit, mfu,
                      budget, gpn)]
    per_chunk = model.num_layers // (layout.pp * layout.vpp)
    best = None
    lo, hi = 1, per_chunk  # memory falls as N grows: bisect for the fewest N that fits
    while lo <= hi:
        n = (lo + hi) // 2
        c = _candidate(model, replace(layout, recompute_granularity="full",
                                      recompute_method="block", recompute_num_layers=n),
                       limit, mfu, budget, gpn)
        if c.fits:
            best, hi = c, n - 1
        else:
            lo = n + 1
    out.append(best or _candidate(model, replace(layout, recompute_granularity="full",
                                                 recompute_method="uniform",
                                                 recompute_num_layers=1),
                                  limit, mfu, budget, gpn))
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def format_estimate(model: ModelConfig, mem: MemoryEstimate, time: TimeEstimate | None = None,
                    *, gpu_memory_gb: float | None = None) -> str:
    """The per-term table with explanations, then the time estimate."""
    lay = mem.layout
    lines = [f"layout: {lay.describe()} ({lay.world_size} GPUs), {lay.dtype}"
             f"{' + FP8' if lay.fp8 else ''}, {lay.impl}, loss {lay.cross_entropy_impl}, "
             f"distributed optimizer {'on' if lay.distributed_optimizer else 'off'}",
             f"model: {model.num_layers} layers, hidden {model.hidden_size}, ffn "
             f"{model.ffn_hidden_size}, heads {model.num_attention_heads}/"
             f"{model.query_groups}, vocab {model.padded_vocab(lay.tp)}, seq {model.seq_length} "
             f"({model.seq_length // lay.cp} tokens per rank)",
             f"memory per GPU (PP stage {mem.stage}, the most loaded):"]
    for name, gib, note in mem.table():
        lines.append(f"  {name:<28} {gib:8.2f} GiB  {note}")
    total_gb = mem.total_bytes / 1e9
    lines.append(f"  {'total':<28} {mem.total_bytes / GIB:8.2f} GiB  = {total_gb:.1f} GB")
    if gpu_memory_gb is not None:
        verdict = "fits" if total_gb <= gpu_memory_gb else "DOES NOT FIT"
        lines.append(f"  {verdict} in {gpu_memory_gb:g} GB")
    if time is not None:
        lines.append(f"time at MFU {time.mfu:.3f}: {time.flops_per_token / 1e9:.1f} GFLOP/token "
                     f"(causal, as the trainer logs), {time.tokens_per_step:,} tokens/step, "
                     f"{time.step_s:.1f} s/step (x{time.slowdown:.2f} bubble/recompute), "
                     f"{time.tokens_per_gpu_s:,.0f} tokens/GPU/s"
                     + (f", {time.days:.1f} days for the token budget" if time.days else ""))
    return "\n".join(lines)


def format_search(model: ModelConfig, cands: list[Candidate], *, gpu_memory_gb: float,
                  top: int = 10, rejected: int = 6) -> str:
    """Ranked fitting layouts, the flags of the best, and the largest rejected ones."""
    fit = [c for c in cands if c.fits]
    lines = [f"{len(fit)} of {len(cands)} layouts fit in {gpu_memory_gb:g} GB "
             f"(seq {model.seq_length}):",
             f"  {'layout':<58} {'GB':>6} {'s/step':>7} {'tok/GPU/s':>9}"]
    for c in fit[:top]:
        lines.append(f"  {c.layout.describe():<58} {c.memory.total_bytes / 1e9:6.1f} "
                     f"{c.time.step_s:7.1f} {c.time.tokens_per_gpu_s:9.0f}")
    bad = [c for c in cands if not c.fits]
    if bad:
        lines.append("rejected (over memory), smallest model-parallel first:")
        bad.sort(key=lambda c: (c.layout.tp * c.layout.cp * c.layout.pp,
                                c.memory.total_bytes))
        for c in bad[:rejected]:
            lines.append(f"  {c.layout.describe():<58} {c.memory.total_bytes / 1e9:6.1f} GB")
    if fit:
        best = fit[0]
        lines.append("best: " + " ".join(best.layout.flags()))
        lines.append(format_estimate(model, best.memory, best.time,
                                     gpu_memory_gb=gpu_memory_gb))
    return "\n".join(lines)
