#!/usr/bin/env python3
"""RULER suite wall time: shared-prefix KV reuse vs plain KV-cache generation vs HF `generate`,
same model, same prompts, one run.

Trains a byte-level BPE (vocab 2048) on the synthetic demo corpus, builds a random LLaMA of the
tiny-demo shape (4 layers, width 256, GQA 8/4, ~2.4M parameters) as a Hugging Face directory,
converts it to our checkpoint format, and runs `run_ruler` on the same tasks, lengths and
samples four times:

1. ours, KV cache + shared-prefix reuse (the tool's default:
   `CausalLM.generate(..., reuse_prefix=True)`),
2. ours, KV cache, every prompt prefilled from scratch (`--no-prefix-reuse`),
3. HF backend (eval/models.py) + shared-prefix reuse,
4. HF `model.generate` (transformers, greedy, its own cache), one call per prompt.

Prints wall seconds, prompt tokens prefilled vs reused, and ratios against run 2; checks that
1 and 2 give the same responses (and 3 and 4 the same as each other).

    python benchmarks/bench_ruler.py [--tasks niah_single_1,niah_single_2,niah_multikey_2,vt]
        [--lengths 4096] [--num-samples 8] [--max-new-tokens 16] [--threads 1]

--max-new-tokens defaults to 16 rather than RULER's 128: a random model never emits EOS, and a
trained one answers a needle in ~10-30 tokens; decoding time is the same in every mode, so a
longer budget only dilutes the prefill difference measured here.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="niah_single_1,niah_single_2,niah_multikey_2,vt")
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    from megatron_longctx.eval.models import load_causal_lm
    from megatron_longctx.eval.ruler import RulerSettings, run_ruler

    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    settings = RulerSettings(tasks=args.tasks.split(","), lengths=lengths,
                             num_samples=args.num_samples, max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf_dir, ours_dir = make_models(root, max(lengths))
        runs = {}
        for name, path, reuse, wrap in (("ours + prefix reuse", ours_dir, True, False),
                                        ("ours, no reuse", ours_dir, False, False),
                                        ("hf backend + prefix reuse", hf_dir, True, False),
                                        ("hf generate()", hf_dir, False, True)):
            model = load_causal_lm(path, prefill_chunk=args.prefill_chunk)
            target = HFGenerate(model) if wrap else model
            start = time.perf_counter()
            results = run_ruler(target, settings, root / name.replace(" ", "_"),
                                reuse_prefix=reuse, log=None, progress=False, plot=False)
            seconds = time.perf_counter() - start
            model.close()
            samples = [s for c in results["cells"] for s in c["samples"]]
            runs[name] = (seconds, samples)
        base = runs["ours, no reuse"][0]
        prompt = sum(s["tokens"] for s in runs["ours, no reuse"][1])
        print(f"{len(runs['ours, no reuse'][1])} prompts, {prompt:,} prompt tokens, "
              f"tasks {args.tasks}, lengths {args.lengths}, {args.max_new_tokens} new tokens, "
              f"{args.threads} thread(s)")
        print(f"{'mode':28s} {'wall s':>8s} {'reused tokens':>14s} {'vs ours no reuse':>17s}")
        for name, (seconds, samples) in runs.items():
            reused = sum(s["reused_tokens"] for s in samples)
            print(f"{name:28s} {seconds:8.2f} {reused:>9,d} ({100 * reused / prompt:3.0f}%) "
                  f"{base / seconds:12.2f}x")

        def same(a: str, b: str) -> str:
            ra = [s["response"] for s in runs[a][1]]
            rb = [s["response"] for s in runs[b][1]]
            return "same responses" if ra == rb else "RESPONSES DIFFER"

        print(f"ours reuse vs no reuse: {same('ours + prefix reuse', 'ours, no reuse')}; "
              f"hf reuse vs hf generate(): "
              f"{same('hf backend + prefix reuse', 'hf generate()')}; "
              f"ours vs hf: {same('ours, no reuse', 'hf generate()')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
