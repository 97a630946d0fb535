"""The demo: the pipeline that runs all four stages on the synthetic corpus
(`data.synthetic`; `make demo`), and the stage-2 mixture comparison (`make ablation`).
Built on the product; nothing in the product imports it.

* `pipeline`: `DemoSettings` and the stages (`prepare_data`, `plan_mixtures`, `train_stages`,
  `evaluate_needles`, `evaluate_ruler`, `write_report`), each running repository tools;
  `Stage2Run` is the stage-2 trainer command both the demo and the ablation run.
* `ablation`: every mixture strategy from one stage-1 checkpoint (`AblationSettings`,
  `run_ablation` on any per-domain datasets; `run_demo_ablation` on the demo corpus).
* `plots`: loss by position for several checkpoints on one figure, per-domain loss changes,
  realised domain shares.
* `cli`: flags generated from a settings dataclass (tools/demo.py, tools/make_corpus.py,
  tools/ablate_mixture.py).
"""
