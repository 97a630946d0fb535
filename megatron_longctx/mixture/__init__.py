"""Stage 2: per-domain stats in, a mixture plan and the data the trainer reads out.

* `plan`: the typed contract (`MixturePlan`, `DomainPlan`, `BucketPlan`; `load_plan`, `save`,
  format version, validation naming file and field) and the held-out split arithmetic
  (round(f * n) documents) every module below shares.
* `planner`: the strategies (per-source length upsampling, global, original, cut, domain
  upsampling) turning stats files into tokens per (domain, length bucket).
* `outputs`: views (derived from the plan, not recorded in it), Megatron blend files
  (`--data-args-path`, `--per-split-data-args-path`), the report and the plan file; `views`:
  bucket / cut index views of the stage-1 datasets that stock Megatron can blend; `report`:
  markdown + plots + the console table.
* `dataset`: the length-upsampled GPTDataset the trainer builds from a plan; `audit`:
  realised shares of what that dataset yields, against the plan.

Reads stage 1's artifacts (megatron_longctx.data), never writes them. Import order (no
cycles): plan <- planner, views <- report <- outputs; plan <- dataset <- audit.
"""
