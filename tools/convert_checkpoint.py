#!/usr/bin/env python3
"""Convert Hugging Face LLaMA checkpoints to megatron-longctx checkpoints and back.

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir /models/Llama-2-7b-hf \
        --save ckpt/llama2-7b [--tensor-model-parallel-size 8] [--pipeline-model-parallel-size 2]
    python tools/convert_checkpoint.py megatron-to-hf --load ckpt/run1 --save hf/run1 \
        [--tokenizer-dir /models/Llama-2-7b-hf] [--max-shard-size 5GB]

Runs in one CPU process. hf-to-megatron writes iteration 0 (model only) with a latest marker,
loadable with --load at any TP/PP; the TP/PP flags are checked against the architecture and set
the vocabulary padding. megatron-to-hf takes a root or an iter_ directory. Outputs appear
atomically (temporary directory renamed at the end). See docs/conversion.md.
"""

import argparse
import sys

from megatron_longctx.config.dtypes import PARAMS_DTYPES
from megatron_longctx.convert.hf_checks import check_hf_dir
from megatron_longctx.convert.hf_llama import (
    ConversionError,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
)
from megatron_longctx.tool_env import quiet_tool_warnings, tool_error

quiet_tool_warnings()
TOOL = "convert_checkpoint.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    h2m = sub.add_parser("hf-to-megatron", help="HF LlamaForCausalLM directory (Mistral or "
                         "Qwen2 without a sliding window too) -> checkpoint")
    h2m.add_argument("--hf-dir", required=True, help="config.json + safetensors/.bin weights")
    h2m.add_argument("--save", required=True, help="new checkpoint root (must not exist or be "
                     "empty)")
    h2m.add_argument("--tensor-model-parallel-size", type=int, default=1,
                     help="TP the checkpoint is meant for (checked; sets vocabulary padding)")
    h2m.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                     help="PP the checkpoint is meant for (checked against the layer count)")
    h2m.add_argument("--params-dtype", choices=PARAMS_DTYPES, default=None,
                     help="dtype of the saved weights (default: config.json's dtype)")
    m2h = sub.add_parser("megatron-to-hf", help="checkpoint -> HF LlamaForCausalLM directory "
                         "(Mistral or Qwen2 when converted from one)")
    m2h.add_argument("--load", required=True, help="checkpoint root or iter_NNNNNNN directory")
    m2h.add_argument("--save", required=True, help="new HF directory (must not exist or be "
                     "empty)")
    m2h.add_argument("--tokenizer-dir", default=None,
                     help="copy tokenizer files from here (default: the checkpoint's recorded "
                     "tokenizer directory, when it exists)")
    m2h.add_argument("--max-shard-size", default="5GB",
                     help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    m2h.add_argument("--dtype", choices=PARAMS_DTYPES, default=None,
                     help="dtype of the written weights (default: the checkpoint's)")
    for p in (h2m, m2h):
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "hf-to-megatron":
            check_hf_dir(args.hf_dir)  # before any work: truncated files, missing tensors
            out = convert_hf_to_megatron(
                args.hf_dir, args.save,
                tensor_model_parallel_size=args.tensor_model_parallel_size,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                params_dtype=args.params_dtype, progress=not args.no_progress)
        else:
            out = convert_megatron_to_hf(
                args.load, args.save, tokenizer_dir=args.tokenizer_dir,
                max_shard_size=args.max_shard_size, dtype=args.dtype,
                progress=not args.no_progress)
    except (ConversionError, OSError, KeyError, ValueError) as err:
        return tool_error(err, TOOL)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
