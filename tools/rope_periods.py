#!/usr/bin/env python3
"""How many rotary pairs complete a full period within a target length, for a RoPE config.

    python tools/rope_periods.py --hf-config /models/Llama-3.1-8B --target-length 131072
    python tools/rope_periods.py --load ckpt/run1 --target-length 131072
    python tools/rope_periods.py --model-preset llama2-7b --rotary-base 5000000 \
        --target-length 131072 [--rope-type yarn --rope-factor 4 ...] [--table] [--json]

Pair i turns at frequency f_i (theta^(-2i/d), rescaled by the scheme) and has wavelength
2 pi / f_i tokens. A pair whose wavelength fits in the context has seen every angle during
training at that length; the others have not (LLaMA-2, theta 1e4, d 128: 46 of 64 complete a
period within 4K, so 18 pairs only ever saw part of their circle). Fu et al.'s recipe raises
the base until the slowest pairs cover the target length, then trains; see docs/rope.md.
Length-dependent schemes (dynamic, longrope) are evaluated at the target length.
The config comes from an HF config.json (file or directory), a checkpoint of ours, or the
trainer's model flags (any --rope-* / --yarn-* / --rotary-* flag, on a preset or --head-dim);
flags override the source's values, and --rope-type replaces its scheme (what would another
scheme give this model?).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from megatron_longctx.config.flags import add_config_flags, given
from megatron_longctx.config.model import ROPE_PARAMETER_FLAGS, ModelConfig
from megatron_longctx.config.presets import PRESET_NAMES, get_preset
from megatron_longctx.tool_env import quiet_tool_warnings, tool_error

quiet_tool_warnings()
TOOL = "rope_periods.py"
ROPE_FIELDS = ("rotary_base", "rotary_percent", "rope_scaling", "rope_scaling_factor",
               "seq_len_interpolation_factor", "max_position_embeddings", "seq_length")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-length", type=int, required=True, help="context length")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--hf-config", help="HF config.json or model directory")
    source.add_argument("--load", help="checkpoint of ours (root or iter_ directory)")
    source.add_argument("--model-preset", choices=PRESET_NAMES, help="a preset's head dim")
    source.add_argument("--head-dim", type=int, help="head dim without a preset")
    parser.add_argument("--table", action="store_true", help="print every pair's wavelength")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    add_config_flags(parser, ModelConfig, titles={"": "RoPE flags (as the trainer's)"})
    return parser


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The ModelConfig the RoPE comes from (architecture only as far as the head dim)."""
    flags = {k: v for k, v in given(args, "").items() if k in ROPE_FIELDS or
             k.startswith(("rope_", "yarn_", "longrope_"))}
    if args.hf_config:
        from megatron_longctx.convert.hf_llama import model_config_from_hf, read_hf_config

        path = Path(args.hf_config)
        hf = (read_hf_config(path) if path.is_dir()
              else json.loads(path.read_text(encoding="utf-8")))
        hf.setdefault("intermediate_size", 1)
        hf.setdefault("num_hidden_layers", 1)
        hf.setdefault("model_type", "llama")
        cfg = model_config_from_hf(hf, where=str(path))
    elif args.load:
        from megatron_longctx.checkpoint.meta import read_meta, resolve_checkpoint

        directory = resolve_checkpoint(args.load)
        if directory is None:
            raise FileNotFoundError(f"{args.load}: no complete checkpoint")
        cfg = ModelConfig(**read_meta(directory)["model"])
    elif args.model_preset:
        cfg = get_preset(args.model_preset)
    elif args.head_dim:
        cfg = ModelConfig(num_layers=1, hidden_size=args.head_dim, ffn_hidden_size=1,
                          num_attention_heads=1)
    else:
        raise ValueError("give --hf-config, --load, --model-preset or --head-dim")
    if "rope_type" in flags:  # another scheme: drop the source's scheme parameters
        cleared = {name: None for name in ROPE_PARAMETER_FLAGS}
        cleared.update(rope_scaling=False, rope_scaling_factor=None, yarn_truncate=True,
                       seq_len_interpolation_factor=None)
        cfg = dataclasses.replace(cfg, **cleared)
    cfg = dataclasses.replace(cfg, **flags)
    if cfg.seq_length > cfg.max_position_embeddings:
        cfg = dataclasses.replace(cfg, max_position_embeddings=cfg.seq_length)
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = model_config(args)
        from megatron_longctx.model.rotary import count_periods

        spec = cfg.rope_spec()
        complete, wavelengths = count_periods(spec, cfg.rotary_dim, args.target_length)
    except (OSError, KeyError, ValueError) as err:
        return tool_error(err, TOOL)
    pairs = len(wavelengths)
    report = {"rope_type": spec.rope_type, "theta": spec.theta, "factor": spec.factor,
              "target_length": args.target_length, "pairs": pairs,
              "complete_periods": complete, "longest_wavelength": float(wavelengths.max()),
              "attention_scaling": spec.attention_scaling()}
    if args.table:
        report["wavelengths"] = [round(float(w), 3) for w in wavelengths]
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{spec.rope_type} RoPE, theta {spec.theta:g}"
          + (f", factor {spec.factor:g}" if spec.factor is not None else "")
          + f": {complete} of {pairs} rotary pairs complete a period within "
          f"{args.target_length} tokens; {pairs - complete} do not (longest wavelength "
          f"{float(wavelengths.max()):,.0f} tokens)")
    if args.table:
        for i, w in enumerate(report["wavelengths"]):
            done = "complete" if w <= args.target_length else ""
            print(f"pair {i:3d}  wavelength {w:14,.1f}  {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
