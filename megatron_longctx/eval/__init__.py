"""Evaluation of long-context checkpoints (the last stage of the pipeline).

* `models`: one causal-LM interface over our megatron checkpoints (TP/CP, KV-cache greedy
  generation, token losses) and Hugging Face directories; `generate(..., reuse_prefix=True)`
  continues from a persistent KV cache that keeps the common prefix with the previous
  sequence (`reserve_cache`, `clear_cache`).
* `needle`: the needle-in-a-haystack protocol of Fu et al. (2024): grid, haystack, insertion at
  sentence boundaries in tokens, scoring, resumable results, heatmap.
* `ruler_tasks`: the RULER-style synthetic tasks (RULER's 13 and HELMET's JSON KV): templates,
  generators, fitting a prompt to a length under the model's tokenizer, scoring.
* `ruler`: the RULER-style run over tasks x lengths with shared-prefix KV reuse, resumable
  results, markdown table, plot.
* `ppl`: loss by context position and domain on held-out documents.

CLIs: tools/eval_needle.py, tools/eval_ruler.py, tools/eval_ppl.py; details in
docs/evaluation.md.
"""
