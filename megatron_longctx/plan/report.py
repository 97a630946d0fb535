"""The planner's answers as text: one layout checked (`--dry-run`), or a layout search."""

from __future__ import annotations

from dataclasses import replace

from megatron_longctx.config.model import ModelConfig
from megatron_longctx.config.plan import PlanConfig
from megatron_longctx.plan.memory import Layout, estimate_memory
from megatron_longctx.plan.search import (
    DEFAULT_MFU,
    MFU_SOURCE,
    estimate_time,
    format_estimate,
    search_layouts,
)


def dry_run_report(model: ModelConfig, layout: Layout, plan: PlanConfig, *,
                   gpus_per_node: int = 8) -> tuple[str, bool]:
    """(text, fits): the estimate of `layout`; when it does not fit, the fastest layouts that do
    on the same GPUs, with their flags."""
    mem = estimate_memory(model, layout, margin_fraction=plan.allocator_margin)
    mfu = plan.mfu or DEFAULT_MFU
    time = estimate_time(model, layout, mfu=mfu, token_budget=plan.token_budget,
                         gpus_per_node=gpus_per_node)
    text = format_estimate(model, mem, time, gpu_memory_gb=plan.gpu_memory_gb)
    if plan.mfu is None:
        text += f"\n(MFU default: {MFU_SOURCE}; --mfu sets a measured one)"
    fits = mem.total_bytes <= plan.gpu_memory_gb * 1e9
    if not fits:
        world = layout.world_size
        gpn = min(gpus_per_node, world)
        cands = search_layouts(model, gpus_per_node=gpn, nodes=max(1, world // gpn),
                               gpu_memory_gb=plan.gpu_memory_gb,
                               global_batch_tokens=layout.micro_batch_size
                               * layout.num_microbatches * layout.dp * model.seq_length,
                               mfu=mfu, base=replace(layout, recompute_granularity=None))
        good = [c for c in cands if c.fits][:3]
        if good:
            text += "\nlayouts estimated to fit on these GPUs, fastest first:"
            for c in good:
                text += (f"\n  {c.layout.describe()}: {c.memory.total_bytes / 1e9:.1f} GB, "
                         f"{c.time.step_s:.1f} s/step\n    flags: {' '.join(c.layout.flags())}")
        else:
            text += "\nno layout of the search space fits on these GPUs: add nodes"
    return text, fits
