"""HF LLaMA <-> megatron-longctx checkpoint conversion and model-only checkpoint I/O.

* `hf_llama`: the name/tensor mapping between Hugging Face `LlamaForCausalLM` and megatron-core's
  GPTModel, the config mapping (RoPE base and scaling included), and the two conversions
  (`convert_hf_to_megatron`, `convert_megatron_to_hf`).
* `model_io`: `save_model_checkpoint` / `load_model_checkpoint`, the model-only half of the
  checkpoint format in docs/checkpoint-format.md (loads at any TP/PP through
  dist_checkpointing), plus `single_process_group` for tools that run in one process.

Usage and measurements: docs/conversion.md. Importing this package is cheap (no torch or
megatron import); the submodules import them.
"""
