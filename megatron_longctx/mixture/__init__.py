"""Stage 2: per-domain stats in, a mixture plan and the data the trainer reads out.

* `planner`: the strategies (per-source length upsampling, global, original, cut, domain
  upsampling) turning stats files into tokens per (domain, length bucket).
* `outputs`: the plan file, Megatron blend files (`--data-args-path`,
  `--per-split-data-args-path`) and the report; `views`: bucket / cut index views of the
  stage-1 datasets that stock Megatron can blend; `report`: markdown + plots.
* `dataset`: the length-upsampled GPTDataset the trainer builds from a plan; `audit`:
  realised shares of what that dataset yields, against the plan.

Reads stage 1's artifacts (megatron_longctx.data), never writes them.
"""
