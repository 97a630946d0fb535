#!/usr/bin/env python3
"""`make demo`: the whole recipe on the embedded synthetic corpus, through the tools' own CLIs.

Stage 3 is the paper in miniature: a tiny LLaMA (the `demo` preset, 1.5M parameters)
pretrained from scratch at 64 tokens on the natural mixture (stage 1, RoPE base 100), then
continually pretrained at 8x that length with the RoPE base raised to 1e6 on the per-source
mixture with 90% long-document tokens in each domain (stage 2), both with the real trainer
(pretrain_longctx.py, megatron-core, CPU + gloo here). Stage 4 evaluates both checkpoints with
the real eval tools (needle at both lengths, loss by position and domain); no result here is
faked. Measured numbers and the settings' history: docs/demo.md. `--strategy cut` or
`original` changes only stage 2's mixture, for the paper's ablation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megatron_longctx.config.mixture import STRATEGIES
from megatron_longctx.data.stats import write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def run(step: str, args: list[str]) -> None:
    print(f"\n== {step}\n$ {' '.join(args)}", flush=True)
    start = time.time()
    subprocess.run([sys.executable, *args], check=True, cwd=REPO)
    print(f"   ({time.time() - start:.1f} s)", flush=True)


def _batch(seq_length: int, tokens_per_step: int) -> list[str]:
    """Micro/global batch giving `tokens_per_step` tokens per step (micro-batch = global)."""
    gbs = max(tokens_per_step // seq_length, 1)
    return ["--micro-batch-size", str(gbs), "--global-batch-size", str(gbs)]


def _fmt(score: float | None) -> str:
    return "n/a" if score is None else f"{score:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument("--total-words", type=int, default=2_000_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model-preset", default="demo")
    parser.add_argument("--short-length", type=int, default=64,
                        help="stage-1 sequence length")
    parser.add_argument("--long-length", type=int, default=512,
                        help="stage-2 sequence length (the extension)")
    parser.add_argument("--short-rotary-base", type=int, default=100)
    parser.add_argument("--long-rotary-base", type=int, default=1000000,
                        help="raised RoPE base for stage 2 (Fu et al.: raise it, then train)")
    parser.add_argument("--stage1-iters", type=int, default=1000)
    parser.add_argument("--stage2-iters", type=int, default=400)
    parser.add_argument("--stage1-tokens-per-step", type=int, default=4096)
    parser.add_argument("--tokens-per-step", type=int, default=8192,
                        help="stage-2 tokens per step")
    parser.add_argument("--strategy", default="per-source",
                        choices=STRATEGIES,
                        help="stage-2 data mixture (tools/blend_mixture.py --strategy)")
    parser.add_argument("--long-fraction", type=float, default=0.9,
                        help="stage-2 share of long documents' tokens within each domain")
    parser.add_argument("--needle-depths", type=int, default=20)
    args = parser.parse_args(argv)
    out = Path(args.output_dir).resolve()
    corpus, tok, data = out / "corpus", out / "tokenizer", out / "data" / "slimpajama"
    mix = out / "mixture"

    run("1a. synthetic SlimPajama-style corpus (7 domains, .jsonl.zst chunks)",
        ["tools/make_corpus.py", "--output-dir", str(corpus),
         "--total-words", str(args.total_words)])
    run("1b. byte-level BPE tokenizer trained offline",
        ["tools/train_tokenizer.py", "--input", str(corpus), "--output-dir", str(tok),
         "--vocab-size", "4096"])
    run("1c. preprocess: per-domain Megatron indexed datasets + stats",
        ["tools/preprocess_data.py", "--input", str(corpus), "--output-prefix", str(data),
         "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok),
         "--append-eod", "--domain-key", "meta.redpajama_set_name",
         "--workers", str(args.workers)])

    print("\n== per-domain datasets (from the stats files)")
    print(f"{'domain':26s} {'docs':>8s} {'tokens':>11s} {'median':>8s} {'>4K share':>9s}")
    for stats_path in sorted(data.parent.glob("slimpajama_*_text_document.stats.json")):
        s = json.loads(stats_path.read_text())
        long_share = s["tokens_longer_than"]["4096"] / max(s["tokens"], 1)
        print(f"{s['domain']:26s} {s['documents']:8,d} {s['tokens']:11,d} "
              f"{s['length']['median']:8.0f} {long_share:9.1%}")

    # Stage 1 trains on the natural mixture (the base model's pretraining data); stage 2 on
    # the chosen one, "long" meaning a document that fills the extended window.
    # Plans are sized for at least 2M tokens: with a few thousand (the reduced test run) the
    # audit of the tiny corpus finds an empty train split in ArXiv (7 documents); the trainer
    # reads only what its steps need either way.
    stage1_tokens = max(args.stage1_iters * args.stage1_tokens_per_step, 2_000_000)
    stage2_tokens = max(args.stage2_iters * args.tokens_per_step, 2_000_000)
    mix1 = out / "mixture_stage1"
    run("2a. stage-1 mixture plan: the natural (original) mixture",
        ["tools/blend_mixture.py", "--data-prefix", f"{data}_*_text_document",
         "--output-dir", str(mix1), "--strategy", "original",
         "--train-tokens", str(stage1_tokens), "--seq-length", str(args.short_length),
         "--valid-fraction", "0.01"])
    # The long fraction applies to the upsampling strategies only (per-source, global).
    # "cut" cuts every document at the stage-1 length, the paper's "cut at 4K" baseline.
    upsample = (["--long-fraction", str(args.long_fraction)]
                if args.strategy in ("per-source", "global") else
                ["--cut-length", str(args.short_length)] if args.strategy == "cut" else [])
    run(f"2b. stage-2 mixture plan ({args.strategy}) + audit of the realized training index",
        ["tools/blend_mixture.py", "--data-prefix", f"{data}_*_text_document",
         "--output-dir", str(mix), "--strategy", args.strategy, *upsample,
         "--long-threshold", str(args.long_length), "--train-tokens", str(stage2_tokens),
         "--seq-length", str(args.long_length), "--valid-fraction", "0.01", "--audit"])

    ckpt, tb = out / "checkpoints", out / "tensorboard"
    common = ["pretrain_longctx.py", "--model-preset", args.model_preset,
              "--tokenizer-model", str(tok), "--weight-decay", "0.1", "--log-interval", "50",
              "--clip-grad", "1.0"]
    run(f"3a. stage 1: pretrain {args.model_preset} from scratch at {args.short_length} tokens",
        [*common, *_batch(args.short_length, args.stage1_tokens_per_step),
         "--mixture-plan", str(mix1 / "mixture_plan.json"),
         "--data-cache-path", str(mix1 / "cache"),
         "--seq-length", str(args.short_length), "--rotary-base", str(args.short_rotary_base),
         "--train-iters", str(args.stage1_iters), "--lr", "3e-3", "--min-lr", "3e-4",
         "--lr-warmup-iters", "20", "--lr-decay-style", "cosine",
         "--save", str(ckpt / "stage1"), "--tensorboard-dir", str(tb / "stage1")])
    run(f"3b. stage 2: continue at {args.long_length} tokens, RoPE base "
        f"{args.short_rotary_base} -> {args.long_rotary_base}, {args.strategy} mixture",
        [*common, *_batch(args.long_length, args.tokens_per_step),
         "--mixture-plan", str(mix / "mixture_plan.json"),
         "--data-cache-path", str(mix / "cache"),
         "--seq-length", str(args.long_length), "--rotary-base", str(args.long_rotary_base),
         "--train-iters", str(args.stage2_iters), "--lr", "1e-3",
         "--lr-decay-style", "constant", "--load", str(ckpt / "stage1"), "--finetune",
         "--save", str(ckpt / "stage2"), "--tensorboard-dir", str(tb / "stage2")])
    evals = out / "eval"
    scores: dict[str, float | None] = {}
    for name, stage in (("before", "stage1"), ("after", "stage2")):
        for label, length in (("", args.long_length), ("short_", args.short_length)):
            key = f"needle_{label}{name}"
            target = evals / f"needle_{stage}_{length}"
            run(f"4. needle ({stage} checkpoint, {length} tokens, synthetic facts)",
                ["tools/eval_needle.py", "--model", str(ckpt / stage),
                 "--tokenizer-model", str(tok), "--needle-type", "synthetic-fact",
                 "--lengths", str(length), "--depths", str(args.needle_depths),
                 "--max-new-tokens", "2", "--training-length",
                 str(args.short_length if stage == "stage1" else args.long_length),
                 "--output-dir", str(target)])
            scores[key] = json.loads((target / "results.json").read_text())["overall"]
        run(f"4. loss by position and domain ({stage} checkpoint, held-out documents)",
            ["tools/eval_ppl.py", "--model", str(ckpt / stage), "--mixture-plan",
             str(mix / "mixture_plan.json"), "--seq-length", str(args.long_length),
             "--max-docs-per-domain", "2", "--min-doc-length", str(args.short_length),
             "--output-dir", str(evals / f"ppl_{stage}")])
    report = {
        **scores,
        "settings": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "paths": {"checkpoints": str(ckpt), "tensorboard": str(tb), "eval": str(evals),
                  "mixture_report": str(mix / "report.md")},
    }
    write_json_atomic(str(out / "report.json"), report)
    lines = ["# megatron-longctx demo", "",
             f"Stage 1: {args.model_preset} at {args.short_length} tokens, RoPE base "
             f"{args.short_rotary_base}, {args.stage1_iters} steps. Stage 2: "
             f"{args.long_length} tokens, base {args.long_rotary_base}, {args.stage2_iters} "
             f"steps on the {args.strategy} mixture. Needle: the synthetic-fact needle, "
             f"{args.needle_depths} depths, greedy, the answer must be in the first 2 tokens.", "",
             "| needle score (0-100) | before stage 2 | after stage 2 |", "|---|---|---|",
             f"| {args.long_length} tokens | {_fmt(scores['needle_before'])} | "
             f"{_fmt(scores['needle_after'])} |",
             f"| {args.short_length} tokens | {_fmt(scores['needle_short_before'])} | "
             f"{_fmt(scores['needle_short_after'])} |", "",
             "Heatmaps: eval/needle_*/heatmap.png; loss by position: "
             "eval/ppl_*/loss_by_position.png; mixture: mixture/report.md."]
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "report.md")
    print("\n" + "\n".join(lines[4:8]))
    print(f"\nreport: {out / 'report.md'} (numbers: {out / 'report.json'})")
    print(f"\ndemo outputs: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
