"""RULER-style suite: scoring by hand, generation checked against RULER's definitions (needle,
key, value and query counts, chain lengths, word frequencies, prompt lengths under the
tokenizer), determinism, an oracle that answers from the prompt alone scores 100 on every
task at every length and a random model ~0, resume, shared-prefix KV reuse equal to plain
generation (ours and HF), and the CLI end to end."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megatron_longctx.eval.ruler import (
    ResultsMismatchError,
    RulerSettings,
    run_ruler,
)
from megatron_longctx.eval.ruler_tasks import (
    NOISE,
    SYNTHETIC_TASKS,
    TASKS,
    SampleMaker,
    TaskResources,
    fwe_counts,
    postprocess_prediction,
    score_prediction,
    string_match_all,
    string_match_part,
    zeta,
)
from tests.unit.test_eval_needle import FakeModel, _cli, make_tiny_hf

LENGTHS = (2048, 8192)  # both sides of RULER's 4096 switch of the cwe frequencies


@pytest.fixture(scope="module")
def tok(hf_tokenizer_dir):
    from megatron_longctx.eval.models import EvalTokenizer

    return EvalTokenizer(hf_tokenizer_dir)


@pytest.fixture(scope="module")
def res() -> TaskResources:
    return TaskResources.load()


# --------------------------------------------------------------------------------------------
# the oracle: answers by each task's rule from the prompt text alone
# --------------------------------------------------------------------------------------------
def oracle_answer(prompt: str) -> str:
    if "special magic" in prompt:
        query = re.findall(r"special magic \w+ for (.+?) mentioned in the provided text",
                           prompt)[-1]
        keys = re.split(r", and |, ", query)
        values = []
        for key in keys:
            values += re.findall(r"One of the special magic \w+ for " + re.escape(key)
                                 + r" is: (\S+)\.", prompt)
        return ", ".join(values)
    if "Memorize and track the chain(s)" in prompt:
        task = prompt[prompt.rindex("Memorize and track the chain(s)"):]
        value = re.search(r"assigned the value (\d+) in the text above", task).group(1)
        found = re.findall(r"VAR (\w+) = " + value + r"\b", task)
        while True:
            more = [v for v in re.findall(r"VAR (\w+) = VAR (\w+)", task)
                    if v[1] in found and v[0] not in found]
            if not more:
                return " ".join(found)
            found += [v[0] for v in more]
    if "Below is a numbered list of words." in prompt:
        task = prompt[prompt.rindex("Below is a numbered list of words."):]
        n = int(re.search(r"What are the (\d+) most common words", task).group(1))
        listing = task[:task.index("\nQuestion:")]
        counts = Counter(re.findall(r"\d+\. (\S+)", listing))
        return " ".join(f"{i + 1}. {w}" for i, (w, _) in enumerate(counts.most_common(n)))
    if "Read the following coded text" in prompt:
        body = prompt[prompt.index("coded words. ") + len("coded words. "):
                      prompt.index("\nQuestion:")]
        counts = Counter(w for w in body.split() if w != "...")
        return " ".join(w for w, _ in counts.most_common(3))
    if "JSON data:" in prompt:
        key = re.findall(r'Key: (".*?")\nCorresponding value:', prompt)[-1]
        return re.search(re.escape(key) + r': "([^"]+)"', prompt).group(1)
    if "Answer the question based on the given documents" in prompt:
        question = prompt[prompt.rindex("Question: ") + 10:prompt.rindex(" Answer:")]
        want = set(re.findall(r"\w+", question.lower()))
        sentences = re.split(r"(?<=[.!?])\s+|\n", prompt[:prompt.rindex("Question: ")])
        return max(sentences, key=lambda s: len(want & set(re.findall(r"\w+", s.lower()))))
    return "nothing"


def oracle_model(tok) -> FakeModel:
    return FakeModel(tok, oracle_answer)


def random_model(tok, seed: int = 0) -> FakeModel:
    rng = np.random.default_rng(seed)

    def reply(prompt: str) -> str:
        return tok.decode([int(i) for i in rng.integers(0, tok.vocab_size, size=30)])
    return FakeModel(tok, reply)


def squad_file(path: Path) -> Path:
    """A tiny SQuAD v2-format file: 6 articles of 2 paragraphs, one answerable question each
    plus one impossible question (dropped, as RULER does)."""
    rng = np.random.default_rng(3)
    data = []
    for a in range(6):
        paragraphs = []
        for p in range(2):
            town = f"town{a}{p}"
            code = f"{int(rng.integers(10000, 99999))}"
            paragraphs.append({
                "context": f"Some filler about place {a} part {p}. The harbour of {town} was "
                           f"built in the year {code}. Other facts follow here.",
                "qas": [{"question": f"In which year was the harbour of {town} built?",
                         "answers": [{"text": code}], "is_impossible": False},
                        {"question": "Unanswerable?", "answers": [], "is_impossible": True}]})
        data.append({"title": f"a{a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"data": data}))
    return path


def hotpot_file(path: Path) -> Path:
    rows = []
    for i in range(8):
        rows.append({"question": f"Which river flows past bridge{i} tower?",
                     "answer": f"river{i}",
                     "context": [[f"Bridge{i}", [f"The bridge{i} stands tall. ",
                                                 f"The bridge{i} tower looks over river{i}."]],
                                 [f"Other{i}", ["An unrelated paragraph. ", "Nothing here."]]]})
    path.write_text(json.dumps(rows))
    return path


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
def test_scoring_by_hand() -> None:
    assert string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 100
    assert string_match_all("only 1234567", ["1234567", "7654321"]) == 50
    assert string_match_all("ABC", ["abc"]) == 100  # case-insensitive substring
    assert string_match_part("Paris, France", ["London", "paris"]) == 100
    assert string_match_part("Rome", ["London", "Paris"]) == 0
    assert postprocess_prediction("  a\x00b\tc \n") == "a\nb\nc"
    assert score_prediction("string_match_all", " 12\x0134 ", ["12", "34"]) == 100
    with pytest.raises(ValueError, match="reference"):
        score_prediction("string_match_all", "x", [])
    assert zeta(2.0) == pytest.approx(np.pi ** 2 / 6, abs=1e-10)


def test_settings_validation_and_skipped_qa(tmp_path) -> None:
    s = RulerSettings(lengths=[4096]).validate()
    assert s.tasks == list(SYNTHETIC_TASKS) and len(s.tasks) == 12
    assert s.new_tokens("niah_single_1") == 128 and s.new_tokens("vt") == 30
    s = RulerSettings(tasks=["qa_1", "vt"], lengths=[4096]).validate()
    assert s.run_tasks() == ["vt"] and "--squad-file" in s.skipped_tasks()["qa_1"]
    sq = squad_file(tmp_path / "squad.json")
    s = RulerSettings(lengths=[4096], squad_file=str(sq)).validate()
    assert s.tasks[-1] == "qa_1" and s.skipped_tasks() == {}
    for bad, flag in ((dict(lengths=[0]), "--lengths"), (dict(num_samples=0), "--num-samples"),
                      (dict(tasks=["nope"]), "--tasks"), (dict(max_new_tokens=0),
                                                         "--max-new-tokens"),
                      (dict(haystack_file="/no/such"), "--haystack-file")):
        with pytest.raises(ValueError, match=flag):
            RulerSettings(**{"lengths": [4096], **bad}).validate()


# --------------------------------------------------------------------------------------------
# generation against RULER's definitions
# --------------------------------------------------------------------------------------------
def _samples(task: str, length: int, tok, res, n: int = 2, seed: int = 42):
    spec = TASKS[task]
    maker = SampleMaker(spec, length, spec.max_new_tokens, tok, res, seed)
    return spec, [maker.make(i) for i in range(n)]


@pytest.mark.parametrize("length", LENGTHS)
def test_prompt_lengths_fit_under_the_tokenizer(tok, res, length) -> None:
    for task in SYNTHETIC_TASKS:
        spec, samples = _samples(task, length, tok, res)
        for s in samples:
            total = len(s.ids) + spec.max_new_tokens  # RULER: prompt + generation <= length
            assert s.ids == tok.bos_ids + tok.encode(s.text)
            assert total <= length, (task, total)
            assert total >= 0.95 * length, (task, total)  # close to the length


def test_niah_counts(tok, res) -> None:
    for task in [t for t in SYNTHETIC_TASKS if t.startswith("niah")]:
        spec, samples = _samples(task, 4096, tok, res)
        p = spec.params
        nk = max(p["num_keys"], p["num_queries"])
        for s in samples:
            needles = re.findall(r"One of the special magic (\w+) for (\S+) is: (\S+)\.", s.text)
            assert len(s.meta["keys"]) == nk and len(set(s.meta["keys"])) == nk
            assert all(len(v) == p["num_values"] for v in s.meta["values"])
            assert len(s.meta["queries"]) == p["num_queries"]
            assert len(s.answers) == p["num_queries"] * p["num_values"]
            real = [n for n in needles if n[1] in s.meta["keys"]]
            assert len(real) == nk * p["num_values"]
            assert len(needles) - len(real) == s.meta["distractors"]
            if p["haystack"] == "needle":
                assert s.meta["distractors"] == s.units > 10
            elif p["haystack"] == "noise":
                assert s.text.count(NOISE) == s.units
            value_re = {"numbers": r"\d{7}", "uuids": r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}"}
            assert all(re.fullmatch(value_re[p["value_type"]], a) for a in s.answers)
            if p["key_type"] == "words":
                assert all(re.fullmatch(r"[A-Za-z]+(-[A-Za-z]+)+", k) for k in s.meta["keys"])
            singular = p["num_queries"] * p["num_values"] == 1
            assert s.text.startswith("A special magic" if singular else "Some special magic")


def test_vt_chains(tok, res) -> None:
    spec, samples = _samples("vt", 4096, tok, res)
    for s in samples:
        (chain,) = s.meta["chains"]
        assert len(chain) == spec.params["num_hops"] + 1 == len(s.answers) == 5
        assert re.fullmatch(r"VAR [A-Z]{5} = \d{5}", chain[0])
        for j, line in enumerate(chain[1:]):
            assert line == f"VAR {s.answers[j + 1]} = VAR {s.answers[j]}"
        task = s.text[s.text.rindex("Memorize and track"):]
        lines = task.split("\n")
        assert [ln for ln in lines if ln.startswith("VAR")] == chain  # in order
        assert task.count(NOISE) == s.units
        assert s.text.count("Memorize and track") == 2  # the one-shot example first
        assert "5 variables are assgined" in s.text


@pytest.mark.parametrize("length,common,rare", [(2048, 6, 1), (8192, 30, 3)])
def test_cwe_frequencies(tok, res, length, common, rare) -> None:
    _, samples = _samples("cwe", length, tok, res)
    for s in samples:
        listing = s.text[s.text.rindex("Below is"):]
        words = re.findall(r"\d+\. (\S+)", listing[:listing.index("\nQuestion:")])
        counts = Counter(words)
        assert {counts[w] for w in s.answers} == {common} and len(s.answers) == 10
        assert len(counts) == s.units and {c for w, c in counts.items()
                                           if w not in s.answers} == {rare}
        # numbered 1..n in order
        assert re.findall(r"(\d+)\. ", listing)[-1] == str(len(words))


def test_fwe_zipf_counts(tok, res) -> None:
    _, samples = _samples("fwe", 4096, tok, res)
    for s in samples:
        body = s.text[s.text.index("coded words. ") + 13:s.text.index("\nQuestion:")]
        counts = Counter(body.split())
        vocab = s.meta["vocab"]
        assert len(vocab) == 4096 // 50 and vocab[0] == "..."
        expected = fwe_counts(s.units, len(vocab), 2.0)
        assert expected == [int(np.floor(s.units * k ** -2.0 / (np.pi ** 2 / 6)))
                            for k in range(1, len(vocab) + 1)]
        assert [counts.get(w, 0) for w in vocab] == expected
        assert s.answers == vocab[1:4] and expected[3] > expected[4]


def test_json_kv_and_qa(tok, res, tmp_path) -> None:
    _, samples = _samples("json_kv", 4096, tok, res)
    for s in samples:
        pairs = re.findall(r'"([0-9a-f-]{36})": "([0-9a-f-]{36})"', s.text)
        assert len(pairs) == s.units == len(dict(pairs))
        assert s.text.count("Corresponding value:") == 3  # 2 demonstrations + the query
        assert dict(pairs)[re.findall(r'Key: "(.*?)"', s.text)[-1]] == s.answers[0]
    qres = TaskResources.load(squad_file=str(squad_file(tmp_path / "s.json")),
                              hotpotqa_file=str(hotpot_file(tmp_path / "h.json")))
    assert len(qres.qa["squad"][0]) == 12 and len(qres.qa["squad"][1]) == 12
    for task in ("qa_1", "qa_2"):
        spec, samples = _samples(task, 2048, tok, qres)
        for s in samples:
            assert s.text.count("Document ") == s.meta["documents"] >= 1
            assert any(a in s.text for a in s.answers)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="--squad-file"):
        TaskResources.load(squad_file=str(tmp_path / "bad.json"))


def test_samples_are_deterministic_per_seed(tok, res) -> None:
    spec = TASKS["niah_multikey_1"]
    a = SampleMaker(spec, 2048, 128, tok, res, 42)
    b = SampleMaker(spec, 2048, 128, tok, res, 42)
    assert a.make(3).ids == b.make(3).ids  # independent of the samples made before
    assert a.make(1).ids == b.make(1).ids != b.make(2).ids
    assert SampleMaker(spec, 2048, 128, tok, res, 7).make(1).ids != a.make(1).ids


# --------------------------------------------------------------------------------------------
# oracle, random model, results and resume
# --------------------------------------------------------------------------------------------
def test_oracle_scores_100_random_near_0_and_resume(tok, tmp_path) -> None:
    sq, hp = squad_file(tmp_path / "squad.json"), hotpot_file(tmp_path / "hotpot.json")
    settings = RulerSettings(lengths=list(LENGTHS), num_samples=2, squad_file=str(sq),
                             hotpotqa_file=str(hp), training_length=3000)
    oracle = oracle_model(tok)
    results = run_ruler(oracle, settings, tmp_path / "oracle", log=None, progress=False)
    assert len(settings.tasks) == 14 and results["cells_done"] == 28
    bad = {(c["task"], c["length"]): [s["response"] for s in c["samples"]]
           for c in results["cells"] if any(s["score"] < 100 for s in c["samples"])}
    assert not bad, bad
    assert results["overall"] == 100.0 and oracle.calls == 56
    assert all(v == 100.0 for v in results["length_means"].values())

    blind = RulerSettings(lengths=[2048], num_samples=3, squad_file=str(sq),
                          hotpotqa_file=str(hp))
    rnd = run_ruler(random_model(tok), blind, tmp_path / "random", log=None, progress=False,
                    plot=False)
    assert rnd["cells_done"] == 14 and rnd["overall"] < 5.0

    out = tmp_path / "oracle"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["scores"]["vt"] == {"2048": 100.0, "8192": 100.0}
    sample = on_disk["cells"][0]["samples"][0]
    for key in ("index", "tokens", "answers", "response", "score", "generated_tokens",
                "reused_tokens", "seconds"):
        assert key in sample
    table = (out / "results.md").read_text()
    assert "| niah_single_1 | 2048 | 8192 |" not in table and "| vt | 100.0 | 100.0 |" in table
    assert "**100.0**" in table
    png = (out / "ruler.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000

    # resume: nothing to do; more samples computes only the new ones
    again = oracle_model(tok)
    run_ruler(again, settings, out, log=None, progress=False, plot=False)
    assert again.calls == 0
    settings.num_samples = 3
    assert run_ruler(again, settings, out, log=None, progress=False,
                     plot=False)["cells_done"] == 28
    assert again.calls == 28
    with pytest.raises(ResultsMismatchError, match="seed"):
        run_ruler(again, RulerSettings(lengths=[2048], seed=1), out, log=None, progress=False)
    with pytest.raises(ResultsMismatchError, match="model"):
        run_ruler(FakeModel(tok, oracle_answer, path="/other"), settings, out, log=None,
                  progress=False)


def test_results_written_after_every_cell(tok, tmp_path) -> None:
    settings = RulerSettings(tasks=["niah_single_1", "vt"], lengths=[2048], num_samples=2)

    def crash_on_third(prompt: str, count=[0]) -> str:  # noqa: B006 (call counter)
        count[0] += 1
        if count[0] == 3:
            raise RuntimeError("killed")
        return oracle_answer(prompt)

    with pytest.raises(RuntimeError, match="killed"):
        run_ruler(FakeModel(tok, crash_on_third), settings, tmp_path, log=None, progress=False)
    assert [c["task"] for c in json.loads((tmp_path / "results.json").read_text())[
        "cells"]] == ["niah_single_1"]
    rest = oracle_model(tok)
    assert run_ruler(rest, settings, tmp_path, log=None, progress=False)["overall"] == 100.0
    assert rest.calls == 2


# --------------------------------------------------------------------------------------------
# prefix reuse on real backends, and the CLI
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, hf_tokenizer_dir) -> tuple[Path, Path]:
    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("ruler-models")
    hf = make_tiny_hf(root / "hf", hf_tokenizer_dir, seed=4)
    return hf, convert_hf_to_megatron(hf, root / "ours")


def test_prefix_reuse_equals_plain_generation(tiny_models, tmp_path) -> None:
    import torch

    from megatron_longctx.eval.models import load_causal_lm

    torch.set_num_threads(1)
    settings = RulerSettings(tasks=["niah_single_1", "niah_single_2", "vt"], lengths=[2048],
                             num_samples=3, max_new_tokens=6)
    for name, path in zip(("hf", "ours"), tiny_models):
        model = load_causal_lm(path, prefill_chunk=512)
        try:
            runs = {}
            for reuse in (True, False):
                runs[reuse] = run_ruler(model, settings, tmp_path / f"{name}-{reuse}",
                                        reuse_prefix=reuse, log=None, progress=False,
                                        plot=False)
        finally:
            model.close()
        for a, b in zip(runs[True]["cells"], runs[False]["cells"]):
            assert [s["response"] for s in a["samples"]] == [
                s["response"] for s in b["samples"]], (name, a["task"])
        reused = {c["task"]: sum(s["reused_tokens"] for s in c["samples"])
                  for c in runs[True]["cells"]}
        # noise haystack: everything up to the first needle is shared
        assert reused["niah_single_1"] > 500, reused
        assert all(s["reused_tokens"] == 0 for c in runs[False]["cells"] for s in c["samples"])
        assert runs[True]["settings"]["prefix_reuse"] and not runs[False]["settings"][
            "prefix_reuse"]


def test_cli_end_to_end(tiny_models, tmp_path, capsys) -> None:
    cli = _cli("eval_ruler")
    hf, ours = tiny_models
    args = cli.build_parser().parse_args(["--model", "m", "--output-dir", "o"])
    settings = cli.settings_from_args(args)
    assert settings.lengths == [4096, 8192, 16384, 32768, 65536, 131072]
    assert settings.num_samples == 500 and settings.seed == 42 and len(settings.tasks) == 12
    out = tmp_path / "cli"
    argv = ["--model", str(ours), "--output-dir", str(out), "--tasks", "niah_single_1,qa_2",
            "--lengths", "1024", "--num-samples", "2", "--max-new-tokens", "4",
            "--num-threads", "1", "--no-progress", "--prefill-chunk", "256"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "overall score" in text and "qa_2 needs an external dataset" in text
    results = json.loads((out / "results.json").read_text())
    assert results["cells_done"] == 1 and results["model"]["kind"] == "megatron"
    assert results["settings"]["skipped_tasks"].keys() == {"qa_2"}
    assert all(s["tokens"] + 4 <= 1024 for s in results["cells"][0]["samples"])
    assert (out / "ruler.png").stat().st_size > 0 and (out / "results.md").is_file()
    assert cli.main(argv) == 0
    assert "1 cells were already" in capsys.readouterr().out
    # bad inputs: exit 2 with one error line naming the flag
    assert cli.main(["--model", str(hf), "--output-dir", str(tmp_path / "x"), "--tasks",
                     "vt", "--lengths", "300", "--num-threads", "1", "--no-progress"]) == 2
    assert "--lengths 300: task vt" in capsys.readouterr().err
    assert cli.main(["--model", str(hf), "--output-dir", str(tmp_path / "x"), "--tasks",
                     "bogus"]) == 2
    assert "--tasks" in capsys.readouterr().err
