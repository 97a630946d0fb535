#!/usr/bin/env python3
"""Document masking (THD micro-batches) vs causal attention over the whole row, side by side,
and what the THD packing costs in pad and dropped tokens.

Two parts:

1. `--lengths` (run with CP2 by default): one training step of the tiny preset on real
   document boundaries (`--data-args`, e.g. the demo corpus), the real trainer, causal then
   `--reset-attention-mask` back to back in the same invocation, each in its own processes
   (peak RSS = that configuration's). Prints step time and peak RSS per rank of both, and
   masked / causal ratios.
2. `--pad-cp` (no model): the documents of `--data-path` prefixes, shuffled (seed 1234) and
   packed into rows of `--pad-seq` tokens the way GPTDataset concatenates them, then laid out
   as THD rows (`parallel.thd.pack_row`): each document padded to a multiple of 2*CP, the
   row's tail cut at the sequence length. Prints the pad and dropped token shares per CP.

    python benchmarks/bench_document_masking.py --lengths 32768 \
        --data-args="--data-path P --tokenizer-type HuggingFaceTokenizer --tokenizer-model T" \
        --pad-data P1 P2 ... --pad-cp 2,4,8 --pad-seq 32768,131072

Results of a run on this machine: docs/long-context.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_long_context import run_config, trainer_argv  # noqa: E402


def pad_overhead(prefixes: list[str], seq_length: int, cp_sizes: list[int],
                 seed: int = 1234) -> dict[int, dict[str, float]]:
    """Pad and dropped token shares of THD packing per CP size (see the module docstring)."""
    from megatron_longctx.data.indexed import read_index
    from megatron_longctx.parallel.thd import pack_row, thd_pad_multiple

    lengths = np.concatenate([read_index(p).document_lengths() for p in prefixes])
    lengths = np.random.default_rng(seed).permutation(lengths.astype(np.int64))
    ends = np.cumsum(lengths)
    rows = int(ends[-1] // seq_length)
    starts_all = np.concatenate([[0], ends[:-1]])
    out = {}
    for cp in cp_sizes:
        pads = dropped = 0
        for r in range(rows):
            lo, hi = r * seq_length, (r + 1) * seq_length
            inside = starts_all[(starts_all > lo) & (starts_all < hi)] - lo
            row = pack_row([0, *inside.tolist()], seq_length, thd_pad_multiple(cp))
            pads += row.pad_tokens
            dropped += row.dropped_tokens
        total = rows * seq_length
        out[cp] = {"rows": rows, "pad": pads / total, "dropped": dropped / total,
                   "documents_per_row": float(len(lengths) / max(rows, 1))}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768", help="tokens per step ('' = none)")
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=2816)
    parser.add_argument("--data-args", default="", help="data + tokenizer flags")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--pad-data", nargs="*", default=[], help="dataset prefixes")
    parser.add_argument("--pad-cp", default="2,4,8")
    parser.add_argument("--pad-seq", default="32768,131072")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args(argv)
    results: dict[str, object] = {}
    lengths = [int(s) for s in args.lengths.split(",") if s]
    if lengths:
        print(f"tiny preset, fp32, CPU, CP{args.cp}; fastest of {args.iters} step(s), peak RSS "
              f"per rank\n{'tokens':>8s} | {'causal step':>11s} {'peak':>8s} | "
              f"{'masked step':>11s} {'peak':>8s} | {'time m/c':>8s} {'mem m/c':>8s}")
    for seq in lengths:
        row = {}
        for name, extra in (("causal", []), ("masked", ["--reset-attention-mask"])):
            row[name] = run_config(trainer_argv(seq, args.vocab, "chunked", args.iters, args.cp,
                                                extra, args.data_args.split() or None),
                                   args.cp, args.timeout)
        results[f"cp{args.cp}/{seq}"] = row
        c, m = row["causal"], row["masked"]
        if "step_s" in c and "step_s" in m:
            print(f"{seq:>8d} | {c['step_s']:>10.1f}s {c['peak_gb']:>6.2f}GB | "
                  f"{m['step_s']:>10.1f}s {m['peak_gb']:>6.2f}GB | "
                  f"{m['step_s'] / c['step_s']:>7.2f}x {m['peak_gb'] / c['peak_gb']:>7.2f}x",
                  flush=True)
        else:
            print(f"{seq:>8d} | {c.get('error', '')[:60]} | {m.get('error', '')[:60]}")
    if args.pad_data:
        cps = [int(c) for c in args.pad_cp.split(",")]
        print("\nTHD packing cost (share of row tokens): pad / dropped")
        for seq in (int(s) for s in args.pad_seq.split(",")):
            cost = pad_overhead(args.pad_data, seq, cps)
            results[f"pad/{seq}"] = cost
            cells = "  ".join(f"CP{cp}: {100 * v['pad']:.2f}% / {100 * v['dropped']:.2f}%"
                              for cp, v in cost.items())
            first = next(iter(cost.values()))
            print(f"  {seq:>7d} tokens ({first['rows']} rows, "
                  f"{first['documents_per_row']:.0f} documents per row): {cells}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
