"""Parallelism: process-group init (torchrun/SLURM), CPU patches for megatron, CP batch split."""
