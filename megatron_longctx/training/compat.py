"""One compatibility check of what the trainer is given to load: the checkpoint of `--load`,
the datasets of `--data-path` (and the blend files) and the `--mixture-plan`, against the
model and tokenizer this run builds. The entrypoint calls `reconcile_inputs` once, before any
process group exists; every field that shapes the model or its inputs is either adopted (with
a log line) or refused (one line naming the field, the file and both values; exit 2), never
replaced silently.

* Shape (`model.*` of longctx_meta.json: layer count, width, FFN width, heads, query groups,
  head dim, Q/K/V bias, tied/untied output layer): refused on a difference (the tensors would
  not fit, or a weight would be dropped: an untied output layer loaded into a tied model).
* Position encoding (`rotary_base`, `rotary_percent`, `rope_type` and every scheme parameter,
  `rope_scaling*`, `seq_len_interpolation_factor`) and `norm_epsilon`: a flag given on the
  command line wins (context extension changes the RoPE base on purpose; logged); otherwise
  the checkpoint's value is adopted (logged).
* `use_distributed_optimizer` on a full resume: refused (the optimizer state is sharded
  differently); `--no-load-optim` loads the weights only.
* Tokenizer of each dataset's stats file and of the plan: its sha256, not only the
  vocabulary size; refused when it differs from this run's tokenizer.
* Largest token id of each dataset: refused when >= this run's vocabulary (`max` over the
  memory-mapped .bin, ~2 GB/s: ~5 s for a 5B-token corpus, once per start).

The vocabulary against the checkpoint's embedding rows stays in
`training.checkpointing.check_vocabulary` (it needs the tensor index).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

import numpy as np

from megatron_longctx.config.flags import FLAG_KEY, given
from megatron_longctx.config.model import ModelConfig
from megatron_longctx.config.tokenizer import NULL_TOKENIZER
from megatron_longctx.config.training import PretrainConfig


def _note(message: str) -> None:
    """A log line on stderr, from rank 0 only (no process group exists yet)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"pretrain_longctx.py: {message}", file=sys.stderr, flush=True)

#: ModelConfig fields whose difference makes the checkpoint's tensors unloadable or drops one.
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "add_qkv_bias",
                "untie_embeddings_and_output_weights")
#: ModelConfig fields a run may change on purpose (context extension); adopted when not given.
NUMERIC_FIELDS = ("rotary_base", "rotary_percent", "rope_type", "rope_scaling",
                  "rope_scaling_factor", "seq_len_interpolation_factor",
                  "rope_original_max_position_embeddings", "rope_low_freq_factor",
                  "rope_high_freq_factor", "yarn_beta_fast", "yarn_beta_slow", "yarn_mscale",
                  "yarn_mscale_all_dim", "yarn_truncate", "rope_attention_factor",
                  "longrope_short_factor", "longrope_long_factor", "norm_epsilon")


class InputMismatchError(ValueError):
    """A checkpoint, dataset or plan does not fit this run; one line naming the field, the
    file and both values."""


def _flag(name: str) -> str:
    field = next(f for f in dataclasses.fields(ModelConfig) if f.name == name)
    flag = field.metadata.get(FLAG_KEY)
    return getattr(flag, "name", None) or "--" + name.replace("_", "-")


def _shape_value(model: dict[str, Any], name: str) -> Any:
    """A shape field with its implied default (None query groups = heads, None head dim =
    hidden / heads), so two spellings of one shape compare equal."""
    value = model.get(name)
    if name == "num_query_groups" and value is None:
        return model.get("num_attention_heads")
    if name == "kv_channels" and value is None and model.get("num_attention_heads"):
        return model["hidden_size"] // model["num_attention_heads"]
    return tuple(value) if isinstance(value, list) else value


def reconcile_checkpoint(cfg: PretrainConfig, given_model: set[str]) -> PretrainConfig:
    """`cfg` with the checkpoint's position-encoding fields adopted where the command line
    does not set them; refuses shape and optimizer mismatches (see the module table).

    Raises:
        InputMismatchError: naming longctx_meta.json, the field, its flag and both values.
    """
    from megatron_longctx.checkpoint.meta import META_NAME, read_meta, resolve_checkpoint

    if not cfg.checkpoint.load:
        return cfg
    directory = resolve_checkpoint(cfg.checkpoint.load)
    if directory is None:
        return cfg
    meta = read_meta(directory)
    where = directory / META_NAME
    saved, ours = meta["model"], dataclasses.asdict(cfg.model)
    for name in SHAPE_FIELDS:
        if name in saved and _shape_value(saved, name) != _shape_value(ours, name):
            raise InputMismatchError(
                f"{where}: model.{name} is {_shape_value(saved, name)!r}, this run builds "
                f"{_shape_value(ours, name)!r} ({_flag(name)}); give the checkpoint's value")
    adopted: dict[str, Any] = {}
    for name in NUMERIC_FIELDS:
        if name not in saved:
            continue
        theirs = tuple(saved[name]) if isinstance(saved[name], list) else saved[name]
        if theirs == ours[name]:
            continue
        if name in given_model:
            _note(f"{_flag(name)} {ours[name]!r} replaces the checkpoint's {theirs!r} "
                  f"({where})")
        else:
            adopted[name] = theirs
            _note(f"{where}: adopting the checkpoint's {_flag(name)} {theirs!r} (this run's "
                  f"default was {ours[name]!r})")
    full = meta.get("has_optimizer", False) and not cfg.checkpoint.finetune \
        and not cfg.checkpoint.no_load_optim
    saved_distopt = meta.get("use_distributed_optimizer")
    if full and saved_distopt is not None and \
            saved_distopt != cfg.optim.use_distributed_optimizer:
        raise InputMismatchError(
            f"{where}: use_distributed_optimizer is {saved_distopt}, this run "
            f"{cfg.optim.use_distributed_optimizer} (--use-distributed-optimizer); resume with "
            "the checkpoint's setting or pass --no-load-optim")
    if not adopted:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **adopted))


def _dataset_prefixes(cfg: PretrainConfig) -> list[tuple[str, str]]:
    """(prefix, the flag that named it) for every dataset this run reads."""
    from megatron_longctx.training import data as train_data

    data = cfg.data
    if data.mock_data:
        return []
    if data.mixture_plan:
        from megatron_longctx.mixture.plan import load_plan

        plan = load_plan(data.mixture_plan)
        return [(d.prefix, f"--mixture-plan {data.mixture_plan}") for d in plan.domains]
    items: list[tuple[list[str], str]] = []
    if data.per_split_data_args_path:
        spec = train_data._read_per_split_spec(data.per_split_data_args_path)
        items = [(train_data._split_items(spec[s]), "--per-split-data-args-path")
                 for s in ("train", "valid", "test") if spec.get(s)]
    elif data.data_path:
        items = [(list(data.data_path), "--data-path")]
    elif data.data_args_path:
        items = [(train_data._read_args_file(data.data_args_path, "--data-args-path"),
                  "--data-args-path")]
    from megatron.core.datasets.utils import get_blend_from_list

    out: list[tuple[str, str]] = []
    for values, flag in items:
        prefixes, _ = get_blend_from_list(values)
        out += [(p, flag) for p in prefixes if (p, flag) not in out]
    return out


def _max_token(prefix: str) -> int:
    from megatron_longctx.data.indexed import read_index

    index = read_index(prefix)
    tokens = np.memmap(f"{prefix}.bin", dtype=index.dtype, mode="r")
    best = -1
    for start in range(0, len(tokens), 1 << 26):
        best = max(best, int(tokens[start:start + (1 << 26)].max()))
    return best


def check_data_inputs(cfg: PretrainConfig, tokenizer: Any) -> None:
    """Each dataset's (and the plan's) tokenizer is this run's, and no token id reaches the
    vocabulary (module table).

    Raises:
        InputMismatchError: naming the stats or plan file (or the .bin), both values.
    """
    sha = tokenizer.unique_identifiers.get("sha256")
    data = cfg.data
    if data.mixture_plan and data.tokenizer_model and sha:
        from megatron_longctx.mixture.plan import load_plan

        planned = load_plan(data.mixture_plan).tokenizer
        if planned.sha256 and planned.sha256 != sha:
            raise InputMismatchError(
                f"{data.mixture_plan}: tokenizer.sha256 {planned.sha256[:12]}.. (vocabulary "
                f"{planned.vocab_size}), --tokenizer-model {data.tokenizer_model} has "
                f"{sha[:12]}.. (vocabulary {tokenizer.vocab_size}): planned on another "
                "tokenizer")
    for prefix, flag in _dataset_prefixes(cfg):
        stats_path = f"{prefix}.stats.json"
        if sha and data.tokenizer_type != NULL_TOKENIZER and os.path.isfile(stats_path):
            from megatron_longctx.data.stats import load_stats

            recorded = (load_stats(stats_path).get("tokenizer") or {}).get("sha256")
            if recorded and recorded != sha:
                raise InputMismatchError(
                    f"{flag}: {stats_path}: tokenizer.sha256 {recorded[:12]}.., this run's "
                    f"tokenizer {sha[:12]}..: tokenized with another tokenizer")
        largest = _max_token(prefix)
        if largest >= tokenizer.vocab_size:
            raise InputMismatchError(
                f"{flag}: {prefix}.bin holds token id {largest}, this run's vocabulary is "
                f"{tokenizer.vocab_size} (ids 0..{tokenizer.vocab_size - 1}): another "
                "tokenizer's data")


def reconcile_inputs(cfg: PretrainConfig, args: argparse.Namespace,
                     tokenizer: Any) -> PretrainConfig:
    """The one compatibility check (`reconcile_checkpoint` then `check_data_inputs`); returns
    `cfg` with the adopted checkpoint fields."""
    cfg = reconcile_checkpoint(cfg, set(given(args, "model")))
    check_data_inputs(cfg, tokenizer)
    return cfg
