"""Layout planning: per-GPU memory and step time of a training layout, and a layout search.

`memory.estimate_memory` breaks one rank's peak into model state (weights, fp32 gradients,
optimizer state, exact to the byte for megatron-core 0.16.1's buffers) and the step's working
set (activations per layer for the layer spec, recompute, pipeline in-flight micro-batches, the
loss, CP buffers, FP8 weight copies) plus a stated allocator margin. `search` ranks the
layouts that fit a cluster by estimated step time (FLOPs from training/metrics.py at an assumed
MFU). Checked against the trainer's measured peaks: benchmarks/bench_plan_memory.py,
docs/slurm.md.
"""
