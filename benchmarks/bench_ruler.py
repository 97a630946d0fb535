#!/usr/bin/env python3
"""RULER suite wall time: our backend (the tool's default: KV cache + shared-prefix reuse) vs
Hugging Face `generate`, same model, same prompts, one run; optionally our backend without
reuse and the HF backend with reuse.

Trains a byte-level BPE (vocab 2048) on the synthetic demo corpus, builds a random LLaMA of the
tiny-demo shape (4 layers, width 256, GQA 8/4, ~2.4M parameters) as a Hugging Face directory,
converts it to our checkpoint format, and runs `run_ruler` on the same tasks, lengths and
samples once per mode (`--modes`, in this order):

* `ours`: ours, KV cache + shared-prefix reuse (`CausalLM.generate(..., reuse_prefix=True)`),
* `ours-no-reuse`: ours, every prompt prefilled from scratch (`--no-prefix-reuse`),
* `hf-reuse`: the HF backend (eval/models.py) + shared-prefix reuse,
* `hf-generate`: HF `model.generate` (transformers, greedy, its own cache), one call per
  prompt: the baseline a plain HF harness gives.

Prints wall seconds, prompt tokens prefilled vs reused, each mode's speed-up over
`hf-generate` (the evaluation's goal: >= 1.5x for `ours`), and whether every mode gave the
same responses as `hf-generate`.

    python benchmarks/bench_ruler.py                  # 8K and 32K, the 12 default tasks, 4 samples
    python benchmarks/bench_ruler.py --lengths 8192 --num-samples 1 --max-new-tokens 16

--max-new-tokens defaults to each task's RULER budget (a random model never emits EOS, so it
always decodes the whole budget; decoding costs the same in every mode, so a smaller budget
only sharpens the prefill difference).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_longctx.tool_env import quiet_tool_warnings  # noqa: E402

quiet_tool_warnings()


def make_models(root: Path, max_length: int) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron
    from megatron_longctx.data.synthetic import CorpusConfig, iter_records
    from megatron_longctx.data.train_tokenizer import train_bpe_tokenizer
    from megatron_longctx.eval.models import EvalTokenizer

    texts = [r["text"] for r in iter_records(CorpusConfig(total_words=300_000, seed=1))]
    tok_dir = train_bpe_tokenizer(texts, str(root / "tokenizer"), vocab_size=2048)
    tok = EvalTokenizer(tok_dir)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=688,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=max(max_length, 8192), rms_norm_eps=1e-5,
                         tie_word_embeddings=False, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    hf = root / "hf"
    model.save_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tok_dir) / name).is_file():
            (hf / name).write_bytes((Path(tok_dir) / name).read_bytes())
    return hf, convert_hf_to_megatron(hf, root / "ours")


class HFGenerate:
    """transformers' own `generate` (greedy, default dynamic cache) behind the suite's model
    interface: the baseline a user gets from a plain HF harness."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.tokenizer = inner.tokenizer

    def describe(self) -> dict:
        return {**self.inner.describe(), "kind": "hf-generate"}

    def generate(self, ids, max_new_tokens, use_cache=True):
        import torch

        eos = self.tokenizer.eos_id
        with torch.inference_mode():
            out = self.inner.model.generate(
                torch.tensor([list(ids)]), max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        new = out[0, len(ids):].tolist()
        return new[:new.index(eos)] if eos in new else new


MODES = ("ours", "ours-no-reuse", "hf-reuse", "hf-generate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=None, help="default: the 12 synthetic tasks")
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="ours,hf-generate",
                        help=f"comma-separated, from {','.join(MODES)}")
    args = parser.parse_args(argv)
    import torch

    from megatron_longctx.eval.models import load_causal_lm
    from megatron_longctx.eval.ruler import RulerSettings, run_ruler

    modes = [m for m in MODES if m in args.modes.split(",")]
    if "hf-generate" not in modes:
        parser.error("--modes must include hf-generate (the baseline)")
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    settings = RulerSettings(tasks=args.tasks.split(",") if args.tasks else [],
                             lengths=lengths, num_samples=args.num_samples,
                             max_new_tokens=args.max_new_tokens).validate()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf_dir, ours_dir = make_models(root, max(lengths))
        runs = {}
        for name in modes:
            path = ours_dir if name.startswith("ours") else hf_dir
            model = load_causal_lm(path, prefill_chunk=args.prefill_chunk)
            target = HFGenerate(model) if name == "hf-generate" else model
            start = time.perf_counter()
            results = run_ruler(target, settings, root / name,
                                reuse_prefix=name in ("ours", "hf-reuse"), log=None,
                                progress=False, plot=False)
            seconds = time.perf_counter() - start
            model.close()
            if results["failed"]:
                raise SystemExit(f"cells failed: {results['failed']}")
            samples = [s for c in results["cells"] for s in c["samples"]]
            runs[name] = (seconds, samples)
        base_s, base = runs["hf-generate"]
        prompt = sum(s["tokens"] for s in base)
        print(f"{len(base)} prompts, {prompt:,} prompt tokens, tasks {','.join(settings.tasks)}, "
              f"lengths {args.lengths}, {args.num_samples} samples, new tokens "
              f"{args.max_new_tokens or 'per task'}, prefill chunk {args.prefill_chunk}, "
              f"{args.threads} thread(s)")
        print(f"{'mode':14s} {'wall s':>8s} {'reused tokens':>16s} {'vs hf-generate':>15s}  "
              "responses")
        for name, (seconds, samples) in runs.items():
            reused = sum(s["reused_tokens"] for s in samples)
            same = [s["response"] for s in samples] == [s["response"] for s in base]
            print(f"{name:14s} {seconds:8.2f} {reused:>9,d} ({100 * reused / prompt:3.0f}%) "
                  f"{base_s / seconds:13.2f}x  {'same' if same else 'DIFFER'}")
        if "ours" in runs:
            print(f"ours vs HF generate(): {base_s / runs['ours'][0]:.2f}x (goal >= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
