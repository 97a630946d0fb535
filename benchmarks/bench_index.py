#!/usr/bin/env python3
"""Index-building kernels: C++ (`megatron_longctx._csrc`) vs their numpy twins, same run.

Builds a synthetic mixture plan shaped like the paper's per-source length upsampling: --docs
documents (default 10M) with lognormal lengths over 7 domains x 2 length buckets (<= 4K, > 4K
tokens), short buckets down-weighted (0.3-0.6) and long ones upsampled (1.5-3.0); then times
  build_document_index  per-bucket repeat selection + Fisher-Yates shuffle of the whole index
  build_sample_index    Megatron sample index at seq_length 131072, as many samples as fit
for both backends (best of --repeats runs each; both outputs must be identical), and prints the
absolute times, the numpy/C++ ratio per function and overall, and whether the targets given to us
(C++ >= 20x numpy overall, C++ < 10 s for 10M documents) are met. Writes bench_output/index.json.

    python benchmarks/bench_index.py [--docs 10000000] [--repeats 5] [--seed 1234] [--no-megatron]

Also times Megatron's own C++ `helpers_cpp.build_sample_idx` on the same stream as a reference
(checked identical; not part of the ratios).

Default run: ~25 s and ~0.7 GB peak RSS on a 2-core machine, 80% of it numpy's Python swap loop
(2.2-2.6 s per build_document_index call; ~0.3 s per million index entries). Timings are the best
of --repeats runs for both backends alike; other processes on the machine still skew them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megatron_longctx.data import native

DOMAINS = 7
LONG_THRESHOLD = 4096  # tokens; bucket = 2 * domain + (length > LONG_THRESHOLD)
SHORT_REPEATS = (0.4, 0.3, 0.6, 0.4, 0.5, 0.4, 0.6)
LONG_REPEATS = (2.5, 3.0, 1.5, 2.5, 2.0, 2.5, 1.5)
TARGET_RATIO = 20.0
TARGET_CSRC_SECONDS = 10.0


def make_plan(n_docs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic corpus: (bucket_of_doc int32, document_lengths int32, repeats float64)."""
    rng = np.random.default_rng(seed)
    # Lognormal(6.5, 1.4): median ~665 tokens, mean ~1.8K, ~10% of documents above 4K tokens.
    lengths = np.clip(rng.lognormal(6.5, 1.4, n_docs), 1, 2**31 - 1).astype(np.int32)
    domain = rng.choice(DOMAINS, size=n_docs, p=[0.5, 0.15, 0.05, 0.05, 0.05, 0.05, 0.15])
    buckets = (2 * domain + (lengths > LONG_THRESHOLD)).astype(np.int32)
    repeats = np.array([f for pair in zip(SHORT_REPEATS, LONG_REPEATS) for f in pair])
    return buckets, lengths, repeats


def best_of(repeats: int, fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    """Minimum wall time of `repeats` calls (the first call also pays page faults) and a result."""
    best = float("inf")
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000_000)
    parser.add_argument("--seq-length", type=int, default=131072)
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement (best)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="bench_output/index.json")
    parser.add_argument(
        "--no-megatron", action="store_true", help="skip the Megatron build_sample_idx reference"
    )
    args = parser.parse_args()
    if native.BACKEND != "csrc":
        print("megatron_longctx._csrc is not built: run `python setup.py build_ext --inplace`")
        return 1

    t0 = time.perf_counter()
    buckets, lengths, repeats = make_plan(args.docs, args.seed)
    print(
        f"plan: {args.docs:,} documents, {int(lengths.sum(dtype=np.int64)):,} tokens, "
        f"{repeats.size} buckets, made in {time.perf_counter() - t0:.1f} s"
    )

    times: dict[str, dict[str, float]] = {}
    t_c, doc_c = best_of(
        args.repeats, lambda: native.build_document_index(buckets, repeats, args.seed)
    )
    t_np, doc_np = best_of(
        args.repeats, lambda: native.build_document_index_numpy(buckets, repeats, args.seed)
    )
    if not np.array_equal(doc_c, doc_np):
        print("MISMATCH: build_document_index differs between C++ and numpy")
        return 1
    del doc_np
    times["build_document_index"] = {"csrc": t_c, "numpy": t_np}

    stream_tokens = int(lengths[doc_c].sum(dtype=np.int64))
    num_samples = (stream_tokens - 1) // args.seq_length  # add_extra_token=True
    t_c, smp_c = best_of(
        args.repeats,
        lambda: native.build_sample_index(doc_c, lengths, args.seq_length, num_samples),
    )
    t_np, smp_np = best_of(
        args.repeats,
        lambda: native.build_sample_index_numpy(doc_c, lengths, args.seq_length, num_samples),
    )
    if not np.array_equal(smp_c, smp_np):
        print("MISMATCH: build_sample_index differs between C++ and numpy")
        return 1
    times["build_sample_index"] = {"csrc": t_c, "numpy": t_np}
    # Reference point, not part of the ratios: Megatron's own C++ build_sample_idx on the same
    # stream (int32 inputs, as GPTDataset passes them).
    megatron_seconds = None
    if not args.no_megatron:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import helpers_cpp
        doc_i32 = doc_c.astype(np.int32)
        megatron_seconds, smp_m = best_of(
            args.repeats,
            lambda: helpers_cpp.build_sample_idx_int64(
                lengths, doc_i32, args.seq_length, 1, stream_tokens, True, 1
            ),
        )
        if not np.array_equal(smp_m, smp_c):
            print("MISMATCH: build_sample_index differs from Megatron's build_sample_idx")
            return 1

    print(
        f"document index: {doc_c.size:,} entries; stream {stream_tokens:,} tokens -> "
        f"{num_samples:,} samples of {args.seq_length}"
    )
    print(f"{'function':<22} {'C++ s':>9} {'numpy s':>9} {'numpy/C++':>10}")
    for name, t in times.items():
        t["ratio"] = t["numpy"] / t["csrc"]
        print(f"{name:<22} {t['csrc']:9.3f} {t['numpy']:9.3f} {t['ratio']:9.1f}x")
    total_c = sum(t["csrc"] for t in times.values())
    total_np = sum(t["numpy"] for t in times.values())
    overall = total_np / total_c
    print(f"{'overall':<22} {total_c:9.3f} {total_np:9.3f} {overall:9.1f}x")
    if megatron_seconds is not None:
        print(
            f"reference: Megatron helpers_cpp.build_sample_idx on the same stream "
            f"{megatron_seconds:.3f} s (identical rows)"
        )
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    load = os.getloadavg()
    print(f"peak RSS {peak_gib:.2f} GiB; load average {load[0]:.2f} (other processes skew times)")

    # The 10 s target is stated for 10M documents; scale linearly for other sizes.
    budget = TARGET_CSRC_SECONDS * args.docs / 10_000_000
    ratio_met = overall >= TARGET_RATIO
    time_met = total_c < budget
    print(
        f"target C++ >= {TARGET_RATIO:.0f}x numpy overall: {'met' if ratio_met else 'NOT met'} "
        f"({overall:.1f}x)"
    )
    print(
        f"target C++ < {budget:.1f} s for {args.docs:,} documents: "
        f"{'met' if time_met else 'NOT met'} ({total_c:.3f} s)"
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "docs": args.docs,
        "seq_length": args.seq_length,
        "seed": args.seed,
        "repeats_per_measurement": args.repeats,
        "timing": "best of repeats, wall seconds",
        "document_index_entries": int(doc_c.size),
        "stream_tokens": stream_tokens,
        "num_samples": num_samples,
        "repeat_factors": repeats.tolist(),
        "seconds": times,
        "megatron_build_sample_idx_seconds": megatron_seconds,
        "peak_rss_gib": round(peak_gib, 3),
        "load_average_1min": load[0],
        "overall": {"csrc": total_c, "numpy": total_np, "ratio": overall},
        "targets": {
            "ratio_min": TARGET_RATIO,
            "ratio_met": ratio_met,
            "csrc_seconds_max": budget,
            "csrc_seconds_met": time_met,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
        },
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
