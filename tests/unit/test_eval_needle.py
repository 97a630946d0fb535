"""Needle-in-a-haystack protocol: scoring by hand, grid, token-exact lengths and insertion at
sentence boundaries, needle types, oracle/blind fake models, results.json + heatmap, resume,
and the CLI end to end on a trainer checkpoint and a tiny HF directory."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_longctx.eval.needle import (
    PAPER_ANSWER,
    PAPER_NEEDLE,
    PAPER_QUESTION,
    PAPER_TEMPLATE,
    Needle,
    NeedleSettings,
    ResultsMismatchError,
    answer_words,
    build_haystack,
    build_prompt,
    depth_grid,
    make_needle,
    paper_lengths,
    run_needle,
    score_response,
    synthetic_haystack_texts,
)

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# shared helpers (also imported by test_eval_ppl.py and tests/distributed/test_eval_tp.py)
# --------------------------------------------------------------------------------------------
def make_tiny_hf(directory: Path, tokenizer_dir: str, seed: int = 0) -> Path:
    """A random tiny LlamaForCausalLM (GQA 4/2, hidden 64) with the tokenizer's vocabulary and
    files, saved with save_pretrained; weights ~N(0, 0.1) so that logits are not flat."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_longctx.eval.models import EvalTokenizer

    tok = EvalTokenizer(tokenizer_dir)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=176,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, eos_token_id=tok.eos_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if param.dim() == 1 else 0.0))
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, directory / name)
    return directory


def _cli(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok(hf_tokenizer_dir):
    from megatron_longctx.eval.models import EvalTokenizer

    return EvalTokenizer(hf_tokenizer_dir)


class FakeModel:
    """A model that answers with `reply(prompt text)`; counts its calls."""

    def __init__(self, tokenizer, reply, path: str = "/fake/model") -> None:
        self.tokenizer = tokenizer
        self.reply = reply
        self.path = path
        self.calls = 0
        self.prompts: list[list[int]] = []

    def describe(self) -> dict:
        return {"kind": "fake", "path": self.path}

    def generate(self, ids, max_new_tokens, use_cache=True):
        self.calls += 1
        self.prompts.append(list(ids))
        return self.tokenizer.encode(self.reply(self.tokenizer.decode(ids)))[:max_new_tokens]


def oracle_reply(prompt: str) -> str:
    """Copies whatever follows 'San Francisco is' (the needle) out of the prompt."""
    match = re.search(r"best thing to do in San Francisco is ([^.]*)\.", prompt)
    return match.group(1) if match else "nothing found"


# --------------------------------------------------------------------------------------------
# scoring and grid
# --------------------------------------------------------------------------------------------
def test_answer_words_and_scores_by_hand() -> None:
    assert answer_words(PAPER_ANSWER) == ["eat", "a", "sandwich", "and", "sit", "in", "dolores",
                                          "park", "on", "sunny", "day"]
    assert answer_words("Don't  STOP_me, café-42!") == ["don", "t", "stop", "me", "café", "42"]
    assert score_response("Eat a sandwich and sit in Dolores Park on a sunny day.",
                          PAPER_ANSWER) == 100.0
    # 6 of the 11 distinct answer words
    assert score_response("Eat a sandwich in DOLORES park!", PAPER_ANSWER) == pytest.approx(
        100 * 6 / 11)
    assert score_response("", PAPER_ANSWER) == 0.0
    assert score_response("The pass key is 71432.", "71432") == 100.0
    assert score_response("714320", "71432") == 0.0  # whole words only
    assert score_response("park park park", "park bench") == 50.0
    with pytest.raises(ValueError, match="no words"):
        score_response("x", " ... ")


def test_paper_grid() -> None:
    lengths = paper_lengths()
    assert len(lengths) == 40 and lengths[0] == 1000 and lengths[-1] == 128000
    assert lengths[1] == round(1000 + 127000 / 39)
    assert depth_grid() == [0.0, 11.0, 22.0, 33.0, 44.0, 56.0, 67.0, 78.0, 89.0, 100.0]
    assert depth_grid(3) == [0.0, 50.0, 100.0]


def test_settings_validation() -> None:
    base = dict(lengths=[100], depths=[0.0])
    NeedleSettings(**base).validate()
    for bad, flag in ((dict(depths=[101.0]), "depths"), (dict(needle="x"), "--question"),
                      (dict(needle_type="passkey", needle="x", question="q"), "--needle"),
                      (dict(template="no context"), "--prompt-template"),
                      (dict(needle_type="nope"), "--needle-type")):
        with pytest.raises(ValueError, match=flag):
            NeedleSettings(**{**base, **bad}).validate()


# --------------------------------------------------------------------------------------------
# haystack, needles and prompts
# --------------------------------------------------------------------------------------------
def test_lengths_and_insertion_are_exact_in_tokens(tok) -> None:
    settings = NeedleSettings(lengths=[2000], depths=[0.0])
    hay = build_haystack(settings, tok, 2000)
    longest = int(np.diff(hay.boundaries).max())  # longest sentence in tokens
    needle = Needle(PAPER_NEEDLE, PAPER_QUESTION, PAPER_ANSWER)
    prefix_ids = tok.encode(PAPER_TEMPLATE.split("{context}")[0])
    for length in (300, 1000, 2000):
        for depth in (0.0, 25.0, 50.0, 100.0):
            prompt = build_prompt(hay, tok, needle, PAPER_TEMPLATE, length, depth)
            assert length - longest - 4 <= len(prompt.ids) <= length
            assert tok.encode(prompt.text) == prompt.ids  # no BOS for this tokenizer
            # the needle starts exactly at insertion_token ...
            rest = tok.decode(prompt.ids[prompt.insertion_token:])
            assert rest.lstrip().startswith(PAPER_NEEDLE)
            # ... right after a sentence end (or at the start of the haystack)
            before = tok.decode(prompt.ids[:prompt.insertion_token])
            assert (before.rstrip().endswith((".", "<book>", "?", "!"))
                    or before.rstrip(" ").endswith("\n")), before[-20:]  # or a line break
            # haystack tokens before the needle = the boundary chosen, +-1 for the joins
            haystack_before = prompt.insertion_token - len(prefix_ids)
            assert abs(haystack_before - prompt.needle_depth / 100 * prompt.haystack_tokens) <= 2
            # and the depth is the requested one, backed up by less than one sentence
            assert depth - 100 * longest / prompt.haystack_tokens <= prompt.needle_depth <= depth
    assert build_prompt(hay, tok, needle, PAPER_TEMPLATE, 2000, 0.0).needle_depth == 0.0
    assert build_prompt(hay, tok, needle, PAPER_TEMPLATE, 2000, 100.0).needle_depth == 100.0
    with pytest.raises(ValueError, match="without haystack"):
        build_prompt(hay, tok, needle, PAPER_TEMPLATE, 40, 50.0)


def test_needle_types_and_synthetic_haystack(tok) -> None:
    from megatron_longctx.data.synthetic import FACT_KEYS, FACT_VALUES, QUESTION_PROMPT_TEMPLATE

    texts = synthetic_haystack_texts(5000, seed=3)
    assert sum(len(t.split()) for t in texts) >= 4000
    assert not any("secret code" in t or "answer :" in t for t in texts)
    fact = NeedleSettings(lengths=[500], depths=[50.0], needle_type="synthetic-fact").validate()
    a, b = make_needle(fact, 500, 50.0), make_needle(fact, 500, 50.0)
    assert a == b and make_needle(fact, 500, 0.0) != a  # per cell, reproducible
    key, value = re.fullmatch(r"the secret code of (\w+) is (\w+) \.", a.text).groups()
    assert key in FACT_KEYS and value in FACT_VALUES and a.answer == value
    assert not any(v in t.split() for t in texts for v in FACT_VALUES)
    assert a.question == QUESTION_PROMPT_TEMPLATE.format(key=key)
    prompt = build_prompt(build_haystack(fact, tok, 500), tok, a, fact.resolved_template(),
                          500, 50.0)
    assert prompt.text.endswith(" " + a.question)
    passkey = NeedleSettings(lengths=[500], depths=[50.0], needle_type="passkey").validate()
    p = make_needle(passkey, 500, 50.0)
    assert re.fullmatch(r"\d{5}", p.answer) and p.text.count(p.answer) == 2


def test_haystack_from_files_repeats_to_length(tok, tmp_path) -> None:
    (tmp_path / "hay").mkdir()
    (tmp_path / "hay" / "a.txt").write_text("One short essay. It has two sentences.")
    (tmp_path / "hay" / "b.jsonl").write_text(json.dumps({"text": "A record! Another one?"})
                                              + "\n")
    settings = NeedleSettings(lengths=[300], depths=[0.0], haystack=str(tmp_path / "hay"))
    hay = build_haystack(settings, tok, 300)
    assert hay.n_tokens >= 300 and hay.text.count("One short essay.") > 3
    assert "A record!" in hay.text
    # every inner boundary follows terminal punctuation or a line break
    before = [hay.text[:hay.char_at(b)] for b in hay.boundaries[1:-1]]
    assert len(before) > 10 and all(t.endswith((".", "!", "?", "\n")) for t in before)


# --------------------------------------------------------------------------------------------
# run, resume, heatmap
# --------------------------------------------------------------------------------------------
def test_oracle_scores_100_blind_0_and_resume(tok, tmp_path) -> None:
    settings = NeedleSettings(lengths=[200, 400], depths=depth_grid(3), training_length=300)
    oracle = FakeModel(tok, oracle_reply)
    results = run_needle(oracle, settings, tmp_path / "oracle", log=None)
    assert results["overall"] == 100.0 and oracle.calls == 6
    assert all(c["response"] == PAPER_ANSWER for c in results["cells"])
    blind = FakeModel(tok, lambda prompt: "xyz qq")
    assert run_needle(blind, settings, tmp_path / "blind", log=None)["overall"] == 0.0

    path = tmp_path / "oracle" / "results.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["overall"] == 100.0 and len(on_disk["cells"]) == 6
    cell = on_disk["cells"][0]
    for key in ("length", "depth", "tokens", "insertion_token", "needle_depth", "response",
                "score", "haystack_tokens"):
        assert key in cell
    assert on_disk["settings"]["training_length"] == 300
    png = (tmp_path / "oracle" / "heatmap.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000

    # resume: nothing to do; a larger grid computes only the new cells
    again = FakeModel(tok, oracle_reply)
    run_needle(again, settings, tmp_path / "oracle", log=None)
    assert again.calls == 0
    bigger = NeedleSettings(lengths=[200, 400, 600], depths=depth_grid(3))
    assert run_needle(again, bigger, tmp_path / "oracle", log=None)["cells_done"] == 9
    assert again.calls == 3
    # another needle or another model refuses to mix results
    with pytest.raises(ResultsMismatchError, match="needle_type"):
        run_needle(again, NeedleSettings(lengths=[200], depths=[0.0], needle_type="passkey"),
                   tmp_path / "oracle", log=None)
    with pytest.raises(ResultsMismatchError, match="model"):
        run_needle(FakeModel(tok, oracle_reply, path="/other"), settings, tmp_path / "oracle",
                   log=None)
    # --overwrite starts over
    fresh = FakeModel(tok, oracle_reply, path="/other")
    run_needle(fresh, settings, tmp_path / "oracle", overwrite=True, log=None, plot=False)
    assert fresh.calls == 6


def test_results_written_after_every_cell(tok, tmp_path) -> None:
    """A crash mid-grid keeps the cells done so far; the rerun does only the rest."""
    settings = NeedleSettings(lengths=[200, 300], depths=[0.0, 100.0])

    def crash_on_third(prompt: str, count=[0]) -> str:  # noqa: B006 (call counter)
        count[0] += 1
        if count[0] == 3:
            raise RuntimeError("killed")
        return oracle_reply(prompt)

    with pytest.raises(RuntimeError, match="killed"):
        run_needle(FakeModel(tok, crash_on_third), settings, tmp_path, log=None)
    assert len(json.loads((tmp_path / "results.json").read_text())["cells"]) == 2
    rest = FakeModel(tok, oracle_reply)
    assert run_needle(rest, settings, tmp_path, log=None)["overall"] == 100.0
    assert rest.calls == 2


def test_cli_grid_flags() -> None:
    cli = _cli("eval_needle")
    args = cli.build_parser().parse_args(["--model", "m", "--output-dir", "o"])
    settings = cli.settings_from_args(args)
    assert settings.lengths == paper_lengths() and settings.depths == depth_grid(10)
    assert settings.needle_type == "paper" and settings.max_new_tokens == 50
    args = cli.build_parser().parse_args(["--model", "m", "--output-dir", "o", "--lengths",
                                          "4000,1000", "--depth-percents", "0,50"])
    assert cli.settings_from_args(args).lengths == [1000, 4000]
    args = cli.build_parser().parse_args(["--model", "m", "--output-dir", "o", "--min-length",
                                          "256", "--max-length", "2048", "--num-lengths", "4"])
    assert cli.settings_from_args(args).lengths == [256, 853, 1451, 2048]


# --------------------------------------------------------------------------------------------
# end to end: trainer checkpoint and HF directory
# --------------------------------------------------------------------------------------------
_TRAINED: dict[str, Path] = {}


def trained_checkpoint(tmp_path_factory, tokenizer_dir: str) -> Path:
    """Two steps of the real trainer (tiny preset, mock data, the test tokenizer recorded);
    made once per session (test_eval_ppl.py uses it too)."""
    import os
    import socket

    if tokenizer_dir in _TRAINED:
        return _TRAINED[tokenizer_dir]
    out = tmp_path_factory.mktemp("trained") / "ckpt"
    with socket.socket() as sock:  # the trainer's default port may be taken on a shared host
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, str(REPO / "pretrain_longctx.py"), "--model-preset", "tiny",
         "--mock-data", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
         tokenizer_dir, "--seq-length", "64", "--train-iters", "2",
         "--micro-batch-size", "1", "--global-batch-size", "1", "--save", str(out)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "MASTER_PORT": str(port)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _TRAINED[tokenizer_dir] = out
    return out


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory, hf_tokenizer_dir) -> Path:
    return trained_checkpoint(tmp_path_factory, hf_tokenizer_dir)


def test_cli_end_to_end_on_trainer_checkpoint_and_hf_dir(trainer_checkpoint, hf_tokenizer_dir,
                                                         tmp_path, capsys) -> None:
    cli = _cli("eval_needle")
    hf = make_tiny_hf(tmp_path / "hf", hf_tokenizer_dir)
    for name, model in (("ours", trainer_checkpoint), ("hf", hf)):
        out = tmp_path / f"needle-{name}"
        argv = ["--model", str(model), "--output-dir", str(out), "--needle-type",
                "synthetic-fact", "--lengths", "200,400", "--depths", "2", "--num-threads", "1",
                "--prefill-chunk", "128"]
        assert cli.main(argv) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["cells_done"] == 4 and results["model"]["kind"] == (
            "megatron" if name == "ours" else "hf")
        assert all(c["tokens"] <= c["length"] and 0 <= c["score"] <= 100
                   for c in results["cells"])
        assert (out / "heatmap.png").stat().st_size > 0
        assert "overall score" in capsys.readouterr().out
        assert cli.main(argv) == 0  # resumed: nothing left to do
        assert "4 cells were already" in capsys.readouterr().out
    ours = json.loads((tmp_path / "needle-ours" / "results.json").read_text())
    assert ours["settings"]["training_length"] == 64  # the checkpoint's --seq-length
    assert ours["model"]["tokenizer"] == hf_tokenizer_dir  # read from longctx_meta.json
    # bad inputs: exit 2 with one error line
    assert cli.main(["--model", str(tmp_path), "--output-dir", str(tmp_path / "x")]) == 2
    assert cli.main(["--model", str(hf), "--output-dir", str(tmp_path / "x"), "--lengths",
                     "20", "--num-threads", "1"]) == 2
    assert "without haystack" in capsys.readouterr().err


def test_prefix_reuse_equals_plain_generation(trainer_checkpoint, hf_tokenizer_dir,
                                              tmp_path) -> None:
    """A depth sweep with the persistent KV cache gives the plain run's responses on both
    backends, and reuses the haystack shared with the previous cell's prompt."""
    import torch

    from megatron_longctx.eval.models import load_causal_lm

    torch.set_num_threads(1)
    hf = make_tiny_hf(tmp_path / "hf", hf_tokenizer_dir, seed=2)
    settings = NeedleSettings(lengths=[300, 600], depths=[0.0, 25.0, 50.0, 75.0, 100.0],
                              needle_type="passkey", max_new_tokens=4)
    for name, path in (("ours", trainer_checkpoint), ("hf", hf)):
        model = load_causal_lm(str(path), prefill_chunk=128)
        try:
            runs = {reuse: run_needle(model, settings, tmp_path / f"{name}-{reuse}",
                                      reuse_prefix=reuse, log=None, plot=False)
                    for reuse in (True, False)}
        finally:
            model.close()
        assert [c["response"] for c in runs[True]["cells"]] == [
            c["response"] for c in runs[False]["cells"]], name
        assert all(c["reused_tokens"] == 0 for c in runs[False]["cells"])
        reused = [c["reused_tokens"] for c in runs[True]["cells"]]
        tokens = [c["tokens"] for c in runs[True]["cells"]]
        # depth 50% of 600 after depth 25%: the haystack up to the 25% insertion is shared
        by_key = {(c["length"], c["depth"]): c for c in runs[True]["cells"]}
        assert by_key[(600, 50.0)]["reused_tokens"] >= by_key[(600, 25.0)][
            "insertion_token"] - 2, name
        assert sum(reused) > 0.25 * sum(tokens), (name, reused, tokens)


def test_bos_prefix_of_the_tokenizer_starts_every_prompt(hf_tokenizer_dir, tmp_path) -> None:
    """A LLaMA-style tokenizer (post-processor adding BOS): prompts start with it, offsets and
    the insertion index still line up."""
    from tokenizers import Tokenizer, processors

    from megatron_longctx.eval.models import EvalTokenizer

    shutil.copytree(hf_tokenizer_dir, tmp_path / "tok")
    backend = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    bos = backend.token_to_id("<|pad|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|pad|> $A", special_tokens=[("<|pad|>", bos)])
    backend.save(str(tmp_path / "tok" / "tokenizer.json"))
    tok = EvalTokenizer(tmp_path / "tok")
    assert tok.bos_ids == [bos] and tok.encode("a b")[0] != bos
    hay = build_haystack(NeedleSettings(lengths=[400], depths=[0.0]), tok, 400)
    prompt = build_prompt(hay, tok, Needle(PAPER_NEEDLE, PAPER_QUESTION, PAPER_ANSWER),
                          PAPER_TEMPLATE, 400, 50.0)
    assert prompt.ids[0] == bos and len(prompt.ids) <= 400
    assert tok.decode(prompt.ids[prompt.insertion_token:]).lstrip().startswith(PAPER_NEEDLE)
