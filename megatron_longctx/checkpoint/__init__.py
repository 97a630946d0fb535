"""The checkpoint format in one place (docs/checkpoint-format.md).

* `meta`: the directory layout (`iter_NNNNNNN/`, `latest_checkpointed_iteration.txt`), the
  `longctx_meta.json` metadata, resolving a `--load` path to a complete checkpoint.
* `model_io`: model-only save/load at any TP/PP through megatron-core's dist_checkpointing
  (converted HF models, evaluation), and the one-process group tools use.
* `integrity`: what every reader checks before a tensor is read (marker, metadata, `common.pt`,
  `.metadata`, shard sizes against the tensor index); failures are `meta.CheckpointError`
  naming the file (docs/checkpoint-format.md, docs/checks.md).

The trainer (full checkpoints with optimizer state: training/checkpointing.py), the converter
and the evaluation tools import this package; it imports nothing above model/ and parallel/.
"""
