"""The demo: a synthetic multi-domain corpus with retrievable facts, and the pipeline that runs
all four stages on it (`make demo`). Not part of the product's data path."""
