"""Evaluation of long-context checkpoints (the last stage of the pipeline).

* `models`: one causal-LM interface over our megatron checkpoints (TP/CP, KV-cache greedy
  generation, token losses) and Hugging Face directories.
* `needle`: the needle-in-a-haystack protocol of Fu et al. (2024): grid, haystack, insertion at
  sentence boundaries in tokens, scoring, resumable results, heatmap.
* `ppl`: loss by context position and domain on held-out documents.

CLIs: tools/eval_needle.py, tools/eval_ppl.py; details in docs/evaluation.md.
"""
