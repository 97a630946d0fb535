"""The demo: a synthetic multi-domain corpus with retrievable facts, and the pipeline that runs
all four stages on it (`make demo`). Not part of the product's data path.

* `corpus`: the deterministic SlimPajama-style corpus generator (`CorpusConfig`,
  `write_corpus`; the needle and RULER code import its facts and haystack from here).
* `pipeline`: `DemoSettings` and the stages (`prepare_data`, `plan_mixtures`, `train_stages`,
  `evaluate_needles`, `evaluate_ruler`, `write_report`), each running repository tools.
* `cli`: flags generated from a settings dataclass (tools/demo.py, tools/make_corpus.py).
"""
