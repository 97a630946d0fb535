"""The one argparse bridge: Megatron-LM flag names -> typed config dataclasses.

Each `parse_*_args` builds its parser, parses, translates once into a config and validates it;
validation errors exit with argparse's usage message naming the flag (status 2).
"""

from __future__ import annotations

import argparse
import os

from megatron_longctx.config.preprocess import ON_ERROR_CHOICES, PreprocessConfig
from megatron_longctx.data.tokenizers import TOKENIZER_TYPES, TokenizerSpec


def slurm_array_defaults(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(shard_index, num_shards) from a SLURM array task's environment, else (0, 1).

    Array ids may start anywhere (`--array=1-16`), so the index is relative to the minimum.
    """
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return 0, 1
    task = int(env["SLURM_ARRAY_TASK_ID"])
    first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    return task - first, int(env["SLURM_ARRAY_TASK_COUNT"])


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", required=True,
                       help="HF tokenizer directory or tokenizer.json; SentencePiece .model")
    group.add_argument("--tokenizer-hf-include-special-tokens", action="store_true",
                       help="HF only: ids of tokenizer(text).input_ids (e.g. with BOS)")


def tokenizer_spec(args: argparse.Namespace) -> TokenizerSpec:
    return TokenizerSpec(
        args.tokenizer_type, args.tokenizer_model, args.tokenizer_hf_include_special_tokens
    )


def build_preprocess_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="jsonl(.gz/.zst) -> Megatron indexed datasets, one per domain, with stats",
    )
    add_tokenizer_args(parser)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="files, globs or directories (.jsonl, .jsonl.gz, .jsonl.zst)")
    group.add_argument("--json-keys", nargs="+", default=["text"])
    group.add_argument("--domain-key", default=None,
                       help="dotted path of the domain, e.g. meta.redpajama_set_name")
    group.add_argument("--split-sentences", action="store_true")
    group.add_argument("--keep-newlines", action="store_true")
    group.add_argument("--lang", default="english")
    group.add_argument("--punkt-sample-bytes", type=int, default=1 << 20,
                       help="text used to train Punkt when no punkt data is installed")
    group = parser.add_argument_group("tokenization")
    group.add_argument("--append-eod", action="store_true")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True)
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    group.add_argument("--log-interval", type=int, default=1000)
    shard, shards = slurm_array_defaults()
    group.add_argument("--shard-index", type=int, default=shard,
                       help="default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN")
    group.add_argument("--num-shards", type=int, default=shards,
                       help="default: SLURM_ARRAY_TASK_COUNT")
    group.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="skip")
    group.add_argument("--batch-bytes", type=int, default=1 << 20)
    group.add_argument("--max-error-samples", type=int, default=20)
    return parser


def parse_preprocess_args(argv: list[str] | None = None) -> PreprocessConfig:
    parser = build_preprocess_parser()
    args = parser.parse_args(argv)
    cfg = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer=tokenizer_spec(args),
        json_keys=args.json_keys,
        domain_key=args.domain_key,
        append_eod=args.append_eod,
        split_sentences=args.split_sentences,
        keep_newlines=args.keep_newlines,
        lang=args.lang,
        punkt_sample_bytes=args.punkt_sample_bytes,
        workers=args.workers,
        log_interval=args.log_interval,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        on_error=args.on_error,
        batch_bytes=args.batch_bytes,
        max_error_samples=args.max_error_samples,
    )
    try:
        cfg.validate()
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    return cfg


def _parse_upweight(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(
                f"--upweight expects DOMAIN=FACTOR[,DOMAIN=FACTOR...], got {text!r}"
            )
    return out


def build_mixture_parser() -> argparse.ArgumentParser:
    from megatron_longctx.config.mixture import STRATEGIES

    parser = argparse.ArgumentParser(
        prog="blend_mixture.py",
        description="per-domain stats -> mixture plan, Megatron blend files and a report",
    )
    parser.add_argument("--data-prefix", nargs="+", required=True,
                        help="dataset prefixes or globs (each with PREFIX.stats.json)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--strategy", choices=STRATEGIES, default="per-source")
    parser.add_argument("--domain-weights", default="slimpajama",
                        help="natural | slimpajama | FILE.json")
    parser.add_argument("--long-threshold", type=int, default=4096)
    parser.add_argument("--long-fraction", type=float, default=None,
                        help="target long-token share inside each domain (default 0.7)")
    parser.add_argument("--short-keep-ratio", type=float, default=None,
                        help="instead: keep each short document with this probability")
    parser.add_argument("--cut-length", type=int, default=4096)
    parser.add_argument("--upweight", type=_parse_upweight, default={},
                        help="domain-upsample: DOMAIN=FACTOR,...")
    parser.add_argument("--train-tokens", type=float, default=5e9)
    parser.add_argument("--seq-length", type=int, default=81920)
    parser.add_argument("--max-epochs", type=float, default=4.0)
    parser.add_argument("--valid-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--audit", action="store_true",
                        help="also build the training index and compare realized shares")
    return parser


def expand_prefixes(patterns: list[str]) -> list[str]:
    """Dataset prefixes from prefixes or globs (a glob may match .stats.json/.idx/.bin files)."""
    import glob

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


def parse_mixture_args(argv: list[str] | None = None):
    """Returns (MixtureConfig, audit flag)."""
    from megatron_longctx.config.mixture import MixtureConfig

    parser = build_mixture_parser()
    args = parser.parse_args(argv)
    try:
        cfg = MixtureConfig(
            data_prefixes=expand_prefixes(args.data_prefix),
            output_dir=args.output_dir,
            strategy=args.strategy,
            domain_weights=args.domain_weights,
            long_threshold=args.long_threshold,
            long_fraction=args.long_fraction,
            short_keep_ratio=args.short_keep_ratio,
            cut_length=args.cut_length,
            upweight=args.upweight,
            train_tokens=args.train_tokens,
            seq_length=args.seq_length,
            max_epochs=args.max_epochs,
            valid_fraction=args.valid_fraction,
            seed=args.seed,
        )
        cfg.validate()
    except ValueError as err:
        parser.error(str(err))
    return cfg, args.audit
