"""RULER-style suite: generated prompts read back through RULER's and HELMET's published
templates and checked against their published parameters (typed here from their sources, not
taken from our TASKS table): needle, key, value and query counts, vt hops and its ~500-token
3-letter-name example, cwe frequencies and example sizes on both sides of 4096, fwe's Zipf
counts, json_kv's pair counts and scoring, QA's question order and gold position. Each of
these mutations fails a test here (checked by hand, 2026-12-07): multivalue answers cut to 1
of 4 values, multikey_1 with 1 key, vt with 1 hop, cwe with other frequencies (either side of
4096), any template sentence changed (niah, singular niah, vt, cwe, fwe, QA, json_kv). Also:
scoring by hand, a LLaMA-3-sized tokenizer at 131,072 tokens (cwe past wonderwords' words), a
failing cell that does not stop the others, the headline (RULER's 13-task mean with QA, else
labelled), a non-repeating default haystack, an oracle that answers from the prompt alone
scores 100 everywhere and a random model ~0, resume, shared-prefix KV reuse equal to plain
generation (ours and HF), and the CLI end to end."""

from __future__ import annotations

import json
import random
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


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def llama3_tok(tmp_path_factory, res):
    """A stand-in for LLaMA-3's tokenizer, built offline: its pre-tokenizer (split regex:
    digits in groups of 3, a word with its leading space), byte-level BPE trained on English
    words so that common words are one token, <|begin_of_text|> as BOS, and LLaMA-3's
    vocabulary size 128,256 (unused entries fill it up)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_longctx.eval.models import EvalTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    texts = [" ".join(res.cwe_words)] * 3 + [" ".join(res.long_words[::50])] + [
        " ".join(str(i) for i in range(1000)), NOISE_LINE * 5]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=100_000, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    spec = json.loads(tok.to_str())  # fill up to 128,256 with entries no merge produces
    vocab = spec["model"]["vocab"]
    vocab.update({f"<unused_{i}>": len(vocab) + i for i in range(128_256 - len(vocab))})
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    out = tmp_path_factory.mktemp("llama3-like")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(out)
    loaded = EvalTokenizer(out)
    assert loaded.vocab_size == 128_256 and loaded.bos_ids == [0]
    return loaded


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


def squad_file(path: Path, articles: int = 6) -> Path:
    """A tiny SQuAD v2-format file: `articles` articles of 2 paragraphs, one answerable
    question each plus one impossible question (dropped, as RULER does)."""
    rng = np.random.default_rng(3)
    data = []
    for a in range(articles):
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
# RULER's and HELMET's published definitions, typed here from their sources (NVIDIA/RULER
# scripts/synthetic.yaml, scripts/data/synthetic/constants.py and generators; HELMET data.py,
# scripts/generate_configs.py): the generated prompts are checked against these, never
# against our own TASKS table.
# --------------------------------------------------------------------------------------------
RULER_13 = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
            "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt",
            "cwe", "fwe", "qa_1", "qa_2")
#: synthetic.yaml: haystack, key type, value type, num_needle_k, num_needle_v, num_needle_q
RULER_NIAH = {
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 1, 1, 4),
}
RULER_TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
RULER_NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are "
    "all the special magic {type_needle_v} for {query} mentioned in the provided text?"
    " The special magic {type_needle_v} for {query} mentioned in the provided text are")
RULER_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
RULER_VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
    "above. Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assigned the value {query}, they are: ")
RULER_CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most "
    "common words in the above list? Answer: The top 10 words that appear most often in the "
    "list are:")
RULER_FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation."
    " Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text? Answer: According to the coded text above, the three most frequently "
    "appeared words are:")
RULER_QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the "
    "question based on the given documents. Only give me the answer and do not output any other"
    " words.\n\nQuestion: {query} Answer:")
NOISE_LINE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
              "back again.")
HELMET_JSON_KV = ("{context}\n\nExtract the value corresponding to the specified key in the "
                  "JSON object below.\n\n{demos}Key: {question}\nCorresponding value:")
HELMET_JSON_KV_DEMO = "Key: {key}\nCorresponding value:{value}"
HELMET_PAIRS = {4096: 50, 8192: 105, 16384: 220, 32768: 440, 65536: 900, 131072: 1800}


def ruler_singular(template: str) -> str:
    """niah.py's rewrite when one value is asked (num_needle_q * num_needle_v == 1)."""
    return (template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            .replace("answers", "answer"))


def template_match(template: str, text: str, patterns: dict[str, str] | None = None,
                   **fixed: str) -> dict[str, str]:
    """Fields of `text` read through `template` (placeholders in `fixed` are literal, in
    `patterns` regexes, others match anything; repeated ones must repeat); fails the test
    when the text does not have its shape."""
    patterns = patterns or {}
    parts = re.split(r"\{(\w+)\}", template)
    pattern, seen = "", set()
    for i, part in enumerate(parts):
        if i % 2 == 0:
            pattern += re.escape(part)
        elif part in fixed:
            pattern += re.escape(fixed[part])
        elif part in seen:
            pattern += f"(?P={part})"
        else:
            seen.add(part)
            pattern += f"(?P<{part}>{patterns.get(part, '.*?')})"
    m = re.fullmatch(pattern, text, re.DOTALL)
    assert m is not None, f"prompt does not follow the template: {text[:200]!r}...{text[-200:]!r}"
    return m.groupdict()


def _samples(task: str, length: int, tok, res, n: int = 2, seed: int = 42):
    spec = TASKS[task]
    maker = SampleMaker(spec, length, spec.max_new_tokens, tok, res, seed)
    return spec, [maker.make(i) for i in range(n)]


def test_task_table_matches_rulers_lists() -> None:
    assert tuple(t for t in TASKS if t != "json_kv") == RULER_13
    assert set(SYNTHETIC_TASKS) == set(RULER_13) - {"qa_1", "qa_2"} | {"json_kv"}
    for task, spec in TASKS.items():
        kind = "niah" if task.startswith("niah") else spec.kind
        want = RULER_TOKENS_TO_GENERATE.get(kind, 100)  # json_kv: HELMET's 100
        assert spec.max_new_tokens == want, task
    assert {t: TASKS[t].metric for t in ("qa_1", "qa_2", "json_kv", "vt")} == {
        "qa_1": "string_match_part", "qa_2": "string_match_part",
        "json_kv": "substring_exact_match", "vt": "string_match_all"}


@pytest.mark.parametrize("length", LENGTHS)
def test_prompt_lengths_fit_under_the_tokenizer(tok, res, length) -> None:
    for task in SYNTHETIC_TASKS:
        spec, samples = _samples(task, length, tok, res)
        for s in samples:
            total = len(s.ids) + spec.max_new_tokens  # RULER: prompt + generation <= length
            assert s.ids == tok.bos_ids + tok.encode(s.text)
            assert total <= length, (task, total)
            if task != "json_kv":  # HELMET's fixed pair count instead
                assert total >= 0.95 * length, (task, total)  # close to the length


@pytest.mark.parametrize("task", list(RULER_NIAH))
def test_niah_prompts_follow_ruler(tok, res, task) -> None:
    haystack, key_type, value_type, nk, nv, nq = RULER_NIAH[task]
    for s in _samples(task, 4096, tok, res, n=3)[1]:
        singular = nv * nq == 1
        template = ruler_singular(RULER_NIAH_TEMPLATE) if singular else RULER_NIAH_TEMPLATE
        kind = value_type[:-1] if singular else value_type
        f = template_match(template, s.text, type_needle_v=kind)
        needles = re.findall(r"One of the special magic " + value_type
                             + r" for (\S+) is: (\S+)\.", f["context"])
        by_key: dict[str, list[str]] = {}
        for k, v in needles:
            by_key.setdefault(k, []).append(v)
        queries = re.split(r", and |, ", f["query"])
        assert len(queries) == nq and len(set(queries)) == nq
        # the keys RULER plants: max(num_needle_k, num_needle_q), each with num_needle_v values
        planted = [k for k in by_key if haystack != "needle" or k in queries]
        assert len(planted) == max(nk, nq) and set(queries) <= set(planted)
        assert all(len(by_key[k]) == nv for k in planted)
        want = [v for q in queries for v in by_key[q]]
        assert sorted(s.answers) == sorted(want) and len(s.answers) == nq * nv
        value_re = {"numbers": r"\d{7}",
                    "uuids": r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}"}[value_type]
        key_re = {"words": r"[A-Za-z]+(-[A-Za-z]+)+", "uuids": value_re}[key_type]
        assert all(re.fullmatch(value_re, v) and re.fullmatch(key_re, k) for k, v in needles)
        lines = f["context"].split("\n")
        if haystack == "noise":
            assert len(lines) == len(needles) + lines.count(NOISE_LINE) > 10
        elif haystack == "needle":  # every line a needle, one per key
            assert len(lines) == len(needles) == len(by_key) > 10
        else:
            assert len(needles) == max(nk, nq) * nv and len(lines) < 3


def test_vt_prompt_follows_ruler(llama3_tok, res) -> None:
    tok = llama3_tok
    for s in _samples("vt", 4096, tok, res, n=3)[1]:
        icl, task = s.text.split("\n\n" + RULER_VT_TEMPLATE[:30])
        task = RULER_VT_TEMPLATE[:30] + task
        # one-shot example: the task with 3-letter names, then "  " + its answer + "\n"
        example, answer = icl.rsplit("they are: ", 1)
        example += "they are: "
        f = template_match(RULER_VT_TEMPLATE, example, num_v="5")
        names = answer.strip().split(" ")
        assert answer == " " + " ".join(names) and len(names) == 5
        assert all(re.fullmatch(r"[A-Z]{3}", n) for n in names)
        used = len(tok.encode(example))
        noise = len(tok.encode("\n" + NOISE_LINE))
        assert 500 - 2 * noise < used <= 500  # RULER fills the example to ~500 tokens
        assert example.count(NOISE_LINE) == s.meta["icl_noise_lines"]
        f = template_match(RULER_VT_TEMPLATE, task, num_v="5")
        chain = [ln for ln in f["context"].split("\n") if ln.startswith("VAR")]
        assert len(chain) == 5  # 1 chain, 4 hops
        assert re.fullmatch(r"VAR ([A-Z]{5}) = " + f["query"], chain[0])
        names = [re.match(r"VAR ([A-Z]{5})", ln)[1] for ln in chain]
        for j in range(1, 5):  # RULER's hop lines end with a space
            assert chain[j] == f"VAR {names[j]} = VAR {names[j - 1]} "
        assert s.answers == names
        assert f["context"].split("\n").count(NOISE_LINE) == s.units


@pytest.mark.parametrize("length,common,rare,example", [(2048, 6, 1, (20, 3, 1)),
                                                         (8192, 30, 3, (40, 10, 3))])
def test_cwe_prompt_follows_ruler(tok, res, length, common, rare, example) -> None:
    def counts_of(text: str) -> tuple[list[str], Counter]:
        f = template_match(RULER_CWE_TEMPLATE, text)
        words = re.findall(r"(\d+)\. (\S+)", f["context"])
        assert [int(i) for i, _ in words] == list(range(1, len(words) + 1))
        return [w for _, w in words], Counter(w for _, w in words)

    for s in _samples("cwe", length, tok, res)[1]:
        head, tail = s.text.split("\n" + RULER_CWE_TEMPLATE[:30])
        shot, shot_answer = head.rsplit("list are: ", 1)
        _, shot_counts = counts_of(shot + "list are:")
        assert len(shot_counts) == example[0]
        top = [w for w, c in shot_counts.items() if c == example[1]]
        assert len(top) == 10 and set(shot_counts.values()) == {example[1], example[2]}
        assert shot_answer == " ".join(f"{i + 1}. {w}" for i, w in enumerate(
            re.findall(r"\d+\. (\S+)", shot_answer)))
        assert sorted(re.findall(r"\d+\. (\S+)", shot_answer)) == sorted(top)
        _, counts = counts_of(RULER_CWE_TEMPLATE[:30] + tail)
        assert {counts[w] for w in s.answers} == {common} and len(s.answers) == 10
        assert {c for w, c in counts.items() if w not in s.answers} == {rare}
        assert len(counts) == s.units


def test_cwe_switches_to_the_larger_word_list(res) -> None:
    """More distinct words than wonderwords holds: the rest come from a larger English list
    (RULER HEAD's fix of the crash at 128K with LLaMA-3's tokenizer)."""
    from megatron_longctx.eval.ruler_tasks import build_cwe

    assert len(res.long_words) > 200_000 > 20 * len(res.cwe_words)
    n = len(res.cwe_words) + 500
    built = build_cwe(TASKS["cwe"], np.random.default_rng(0), n, res, 131072)
    words = set(re.findall(r"\d+\. (\S+)", built.text.split("\n" + RULER_CWE_TEMPLATE[:30])[1]))
    assert len(words) == n and set(res.cwe_words) < words


def test_fwe_prompt_follows_ruler(tok, res) -> None:
    for s in _samples("fwe", 4096, tok, res)[1]:
        f = template_match(RULER_FWE_TEMPLATE, s.text)
        counts = Counter(f["context"].split())
        vocab = s.meta["vocab"]
        assert len(vocab) == 4096 // 50 and vocab[0] == "..."
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in vocab[1:])
        # rank k occurs floor(words * k^-2 / zeta(2)) times (alpha 2)
        expected = [int(np.floor(s.units * k ** -2.0 / (np.pi ** 2 / 6)))
                    for k in range(1, len(vocab) + 1)]
        assert fwe_counts(s.units, len(vocab), 2.0) == expected
        assert [counts.get(w, 0) for w in vocab] == expected
        assert s.answers == [w for w, _ in Counter(
            {w: c for w, c in counts.items() if w != "..."}).most_common(3)]


def test_json_kv_follows_helmet(tok, llama3_tok, res) -> None:
    # a small-vocabulary tokenizer cannot fit HELMET's 25 pairs in 2K: the most that fit
    spec, (s, _) = _samples("json_kv", 2048, tok, res)
    maker = SampleMaker(spec, 2048, spec.max_new_tokens, tok, res, 42)
    assert s.units < 25 and len(maker._make(0, s.units + 1)[1]) + 100 > 2048
    for length in (2048, 4096):
        for s in _samples("json_kv", length, llama3_tok, res)[1]:
            f = template_match(HELMET_JSON_KV, s.text, {"question": '"[^"\n]*"'})
            pairs = json.loads(f["context"][len("JSON data:\n"):])
            want = HELMET_PAIRS.get(length, round(50 * length / 4096))
            assert len(pairs) == s.units == want  # HELMET's count, not the tokenizer's
            demos = f["demos"].split("\n\n")
            assert demos[-1] == "" and len(demos) == 3  # 2 demonstrations
            for demo in demos[:2]:
                d = template_match(HELMET_JSON_KV_DEMO, demo)
                assert pairs[json.loads(d["key"])] == d["value"][1:] and d["value"][0] == " "
            assert s.answers == [pairs[json.loads(f["question"])]]
    uid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert score_prediction("substring_exact_match", f" {uid.upper()}\n", [uid]) == 100
    assert score_prediction("substring_exact_match", f"The value is {uid}.", [uid]) == 100
    assert score_prediction("substring_exact_match", uid.replace("-", ""), [uid]) == 100
    assert score_prediction("substring_exact_match", uid[:20], [uid]) == 0


def test_qa_follows_ruler(tok, tmp_path) -> None:
    sq = squad_file(tmp_path / "s.json", articles=60)  # more documents than 2K holds
    qres = TaskResources.load(squad_file=str(sq),
                              hotpotqa_file=str(hotpot_file(tmp_path / "h.json")))
    file_order = [qa["question"] for a in json.loads(sq.read_text())["data"]
                  for p in a["paragraphs"] for qa in p["qas"] if not qa["is_impossible"]]
    assert len(qres.qa["squad"][0]) == 120 == len(qres.qa["squad"][1])
    for task in ("qa_1", "qa_2"):
        spec, samples = _samples(task, 2048, tok, qres, n=4)
        positions = set()
        for s in samples:
            f = template_match(RULER_QA_TEMPLATE, s.text)
            docs = re.split(r"\n\nDocument \d+:\n", "\n\n" + f["context"])[1:]
            assert f["context"].startswith("Document 1:\n") and len(docs) == s.meta["documents"]
            if task == "qa_1":  # question i = the i-th answerable question in file order
                assert f["query"] == file_order[s.index]
                gold = [i for i, d in enumerate(docs) if s.answers[0] in d]
                # gold document (first in RULER's list) where random.Random(42).shuffle puts it
                order = list(range(len(docs)))
                random.Random(42).shuffle(order)
                assert gold == [order.index(0)]
                positions.add((len(docs), gold[0]))
        if task == "qa_1":
            assert len(positions) == 1  # the same depth for every sample of a length
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="--squad-file"):
        TaskResources.load(squad_file=str(tmp_path / "bad.json"))


def test_default_essay_haystack_does_not_repeat(res) -> None:
    words = res.essay(150_000)  # more than a 128K prompt holds
    assert res.essay(1000) == words[:1000] and len(words) == 150_000
    grams = [tuple(words[i:i + 12]) for i in range(0, len(words) - 12)]
    assert len(set(grams)) == len(grams)
    assert "generated" in res.essay_source


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


def test_headline_is_rulers_13_task_mean(tok, tmp_path) -> None:
    """With QA files the headline is the mean over RULER's 13 tasks (json_kv, HELMET's, shown
    but not averaged); without them it is labelled with the tasks it averages."""
    sq, hp = squad_file(tmp_path / "squad.json"), hotpot_file(tmp_path / "hotpot.json")

    def some_right(prompt: str) -> str:  # right except on QA and json_kv
        if "JSON data:" in prompt or "Answer the question based" in prompt:
            return "no idea"
        return oracle_answer(prompt)

    full = run_ruler(FakeModel(tok, some_right), RulerSettings(
        lengths=[2048], num_samples=1, squad_file=str(sq), hotpotqa_file=str(hp)),
        tmp_path / "full", log=None, progress=False)
    scores = {t: full["scores"][t]["2048"] for t in full["scores"]}
    assert len(scores) == 14 and scores["qa_1"] == scores["json_kv"] == 0.0
    assert full["overall"] == pytest.approx(np.mean([scores[t] for t in RULER_13]))
    assert full["overall"] == pytest.approx(100 * 11 / 13)
    assert full["headline"]["label"] == "RULER 13-task mean"
    table = (tmp_path / "full" / "results.md").read_text()
    assert "**RULER 13-task mean: 84.6**" in table and "| json_kv (not averaged) |" in table
    assert "essay haystack: generated essay" in table

    lines: list[str] = []
    part = run_ruler(FakeModel(tok, some_right), RulerSettings(lengths=[2048], num_samples=1),
                     tmp_path / "part", log=lines.append, progress=False, plot=False)
    label = part["headline"]["label"]
    assert part["overall"] == 100.0 and part["headline"]["tasks"] == [
        t for t in RULER_13 if not t.startswith("qa")]
    assert label.startswith("mean of 11 tasks (niah_single_1,") and "not RULER's 13" in label
    assert "qa_1, qa_2 not run" in label
    saved = json.loads((tmp_path / "part" / "results.json").read_text())
    assert saved["headline"]["label"] == label
    assert f"**{label}: 100.0**" in (tmp_path / "part" / "results.md").read_text()
    assert f"headline: {label}" in lines and any("essay haystack: generated" in x for x in lines)


def test_a_failing_task_does_not_stop_the_others(tok, tmp_path) -> None:
    settings = RulerSettings(tasks=["vt", "niah_single_1"], lengths=[600, 2048],
                             num_samples=1)
    results = run_ruler(oracle_model(tok), settings, tmp_path, log=None, progress=False)
    assert [(f["task"], f["length"]) for f in results["failed"]] == [("vt", 600)]
    assert "--lengths 600: task vt" in results["failed"][0]["error"]
    assert results["scores"] == {"niah_single_1": {"600": 100.0, "2048": 100.0},
                                 "vt": {"2048": 100.0}}
    table = (tmp_path / "results.md").read_text()
    assert "| vt | failed | 100.0 |" in table and "vt at 600 tokens failed: " in table
    assert json.loads((tmp_path / "results.json").read_text())["failed"][0]["task"] == "vt"


@pytest.mark.slow
def test_128k_with_a_llama3_sized_tokenizer(llama3_tok, tmp_path) -> None:
    """cwe at 131,072 tokens needs more distinct words than wonderwords holds with LLaMA-3's
    tokenizer: it draws from the larger list; fwe and json_kv run too."""
    settings = RulerSettings(tasks=["cwe", "fwe", "json_kv"], lengths=[131072], num_samples=1)
    results = run_ruler(FakeModel(llama3_tok, oracle_answer), settings, tmp_path, log=None,
                        progress=False, plot=False)
    assert results["failed"] == [] and results["cells_done"] == 3
    assert results["overall"] == 100.0  # the oracle reads every answer off the prompt
    cells = {c["task"]: c["samples"][0] for c in results["cells"]}
    res = TaskResources.load()
    assert cells["cwe"]["units"] > len(res.cwe_words)
    assert cells["json_kv"]["units"] == 1800  # HELMET's count at 128K
    assert all(131072 - 128 < s["tokens"] + TASKS[t].max_new_tokens <= 131072
               for t, s in cells.items() if t != "json_kv")


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
    assert "qa_2 needs an external dataset" in text
    assert "mean of 1 tasks (niah_single_1); not RULER's 13-task mean" in text
    assert "essay haystack: generated essay" in text
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
