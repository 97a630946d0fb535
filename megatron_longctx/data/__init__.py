"""Stage 1: raw jsonl(.gz/.zst) -> per-domain Megatron .bin/.idx + stats.json.

* `records`: reading and routing documents (domain key, json keys, corrupt-line policy);
  `sentences`: optional sentence splitting; `tokenizers`: HF / SentencePiece / Null backends.
* `preprocess`: the executor (local pool or SLURM array shard) turning records into datasets;
  `indexed`: the .bin/.idx writer (megatron's format, atomic publish); `merge`: shard merging.
* `stats`: per-domain token counts and length histograms, the only input of stage 2;
  `native`: the csrc index kernels (pybind11) with numpy twins, used by stats and the
  stage-2 dataset; `train_tokenizer`: a small BPE for tests and the demo.
* `synthetic`: the deterministic SlimPajama-style corpus with retrievable facts (the demo's
  data, the tests' input, and the needle/RULER tools' synthetic haystack and fact needles).
"""
