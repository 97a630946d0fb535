"""The argparse bridge of stages 1 and 2: parsers generated from the config dataclasses.

`tools/preprocess_data.py` gets its flags from `PreprocessConfig` and `TokenizerSpec`,
`tools/blend_mixture.py` from `MixtureConfig` (plus its own `--audit`); the pretrain entrypoint's
parser lives beside its configs in config/training.py. Each `parse_*_args` builds the parser,
translates once (config/flags.py, generic) and validates; a validation error exits with
argparse's usage message naming the flag (status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os

from megatron_longctx.config.flags import add_config_flags, config_from_namespace
from megatron_longctx.config.mixture import MixtureConfig
from megatron_longctx.config.preprocess import PreprocessConfig, slurm_array_defaults

__all__ = ["build_mixture_parser", "build_preprocess_parser", "expand_prefixes",
           "parse_mixture_args", "parse_preprocess_args", "slurm_array_defaults"]

#: argument-group titles of tools/preprocess_data.py (Megatron-LM's grouping).
PREPROCESS_GROUPS = {"tokenizer": "tokenizer", "input": "input data",
                     "tokenization": "tokenization", "output": "output data",
                     "runtime": "runtime"}


def build_preprocess_parser() -> argparse.ArgumentParser:
    """tools/preprocess_data.py's parser: Megatron-LM's flags plus ours (README, stage 1)."""
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="jsonl(.gz/.zst) -> Megatron indexed datasets, one per domain, with stats",
    )
    add_config_flags(parser, PreprocessConfig, titles=PREPROCESS_GROUPS)
    return parser


def parse_preprocess_args(argv: list[str] | None = None) -> PreprocessConfig:
    """Parse and validate; usage errors exit 2 naming the flag."""
    parser = build_preprocess_parser()
    cfg = config_from_namespace(PreprocessConfig, parser.parse_args(argv))
    try:
        cfg.validate()
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    return cfg


def build_mixture_parser() -> argparse.ArgumentParser:
    """tools/blend_mixture.py's parser: MixtureConfig's flags plus --audit."""
    parser = argparse.ArgumentParser(
        prog="blend_mixture.py",
        description="per-domain stats -> mixture plan, Megatron blend files and a report",
    )
    add_config_flags(parser, MixtureConfig)
    parser.add_argument("--audit", action="store_true",
                        help="also build the training index and compare realized shares")
    return parser


def expand_prefixes(patterns: list[str]) -> list[str]:
    """Dataset prefixes from prefixes or globs (a glob may match .stats.json/.idx/.bin files)."""
    out: list[str] = []
    for pattern in patterns:
        if os.path.exists(pattern + ".stats.json") or os.path.exists(pattern + ".idx"):
            out.append(pattern)
            continue
        matches = sorted(glob.glob(pattern) + glob.glob(pattern + ".stats.json"))
        prefixes = sorted({m.removesuffix(".stats.json").removesuffix(".idx")
                           .removesuffix(".bin") for m in matches
                           if m.endswith((".stats.json", ".idx", ".bin"))})
        if not prefixes:
            raise ValueError(f"--data-prefix {pattern!r}: no dataset (.stats.json) matches")
        out.extend(p for p in prefixes if p not in out)
    return out


def parse_mixture_args(argv: list[str] | None = None) -> tuple[MixtureConfig, bool]:
    """Returns (MixtureConfig with --data-prefix globs expanded, the --audit flag)."""
    parser = build_mixture_parser()
    args = parser.parse_args(argv)
    audit = args.audit
    del args.audit
    try:
        cfg = config_from_namespace(MixtureConfig, args)
        cfg = dataclasses.replace(cfg, data_prefixes=expand_prefixes(cfg.data_prefixes))
        cfg.validate()
    except ValueError as err:
        parser.error(str(err))
    return cfg, audit
