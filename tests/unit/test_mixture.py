"""Mixture planner: strategies on SlimPajama-shaped stats, failures, views, blend files, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_longctx.config.mixture import SLIMPAJAMA_SHARES, MixtureConfig
from megatron_longctx.data.indexed import read_document, read_index
from megatron_longctx.data.stats import load_stats
from megatron_longctx.mixture.outputs import planned_views, write_plan_outputs
from megatron_longctx.mixture.plan import MixturePlan, load_plan
from megatron_longctx.mixture.planner import PlanError, plan_mixture
from tests.unit.mixture_fixtures import make_lengths, make_slimpajama_like, write_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sp_prefixes(tmp_path_factory) -> list[str]:
    return make_slimpajama_like(tmp_path_factory.mktemp("sp"), total_tokens=3_000_000)


def _plan(prefixes, tmp_path, **kw) -> MixturePlan:
    kw.setdefault("train_tokens", 2e6)
    kw.setdefault("seq_length", 8192)
    return plan_mixture(MixtureConfig(data_prefixes=prefixes, output_dir=str(tmp_path), **kw))


def _by_domain(plan) -> dict:
    return {d.domain: d for d in plan.domains}


def _natural_long(prefix: str, threshold: int) -> float:
    lengths = read_index(prefix).document_lengths()
    return lengths[lengths > threshold].sum() / lengths.sum()


def test_per_source_keeps_domain_shares_and_hits_long_target(sp_prefixes, tmp_path):
    plan = _plan(sp_prefixes, tmp_path, strategy="per-source", long_fraction=0.7)
    total = sum(SLIMPAJAMA_SHARES.values())
    for d in plan.domains:
        target_tokens = sum(b.target_tokens for b in d.buckets)
        assert abs(target_tokens / plan.train_tokens - SLIMPAJAMA_SHARES[d.domain] / total) \
            < 0.005
        long_b = d.buckets[1]
        natural = _natural_long(d.prefix, 4096)
        assert d.long_share_before == pytest.approx(natural, abs=1e-9)  # exact at 2**k
        expected = max(natural, 0.7) if natural > 0 else 0.0
        assert long_b.target_tokens / target_tokens == pytest.approx(expected, rel=1e-9)
        for b in d.buckets:
            if b.unique_tokens:
                assert b.repeat == pytest.approx(b.target_tokens / b.unique_tokens)
    cc = _by_domain(plan)["RedPajamaCommonCrawl"]
    assert cc.long_share_before < 0.5 < cc.long_share_after  # really upsampled
    assert plan.totals.long_share_after > plan.totals.long_share_before


def test_per_source_short_keep_ratio_matches_released_code(sp_prefixes, tmp_path):
    plan = _plan(sp_prefixes, tmp_path, strategy="per-source", short_keep_ratio=0.1)
    for d in plan.domains:
        short, long_ = (b.unique_tokens for b in d.buckets)
        if long_ > 0:
            assert d.long_share_after == pytest.approx(long_ / (long_ + 0.1 * short))


def test_global_raises_long_share_but_shifts_domains(sp_prefixes, tmp_path):
    plan = _plan(sp_prefixes, tmp_path, strategy="global", long_fraction=0.7)
    assert plan.totals.long_share_after == pytest.approx(0.7, abs=1e-6)
    d = _by_domain(plan)
    # Long-rich domains gain share, short-heavy ones lose it (the paper's objection).
    assert d["RedPajamaBook"].target_share > d["RedPajamaBook"].weight_share + 0.01
    assert d["RedPajamaC4"].target_share < d["RedPajamaC4"].weight_share - 0.01
    k = plan.details["global_short_keep_ratio"]
    for dom in d.values():
        ld = dom.long_share_before
        if dom.target_share > 0:
            assert dom.long_share_after == pytest.approx(ld / (ld + k * (1 - ld)))


def test_original_and_natural_weights(sp_prefixes, tmp_path):
    plan = _plan(sp_prefixes, tmp_path, strategy="original", domain_weights="natural")
    for d in plan.domains:
        assert d.target_share == pytest.approx(d.natural_share)
        assert d.long_share_after == d.long_share_before
        # natural lengths: every non-empty bucket of a domain repeats equally
        repeats = [b.repeat for b in d.buckets if b.unique_tokens > 0]
        assert repeats == pytest.approx([repeats[0]] * len(repeats))


def test_domain_upsample_multiplies_weights(sp_prefixes, tmp_path):
    plan = _plan(sp_prefixes, tmp_path, strategy="domain-upsample",
                 upweight={"Book": 3.0, "RedPajamaArXiv": 2.0})
    d = _by_domain(plan)
    ratio = d["RedPajamaBook"].target_share / d["RedPajamaC4"].target_share
    base = SLIMPAJAMA_SHARES["RedPajamaBook"] / SLIMPAJAMA_SHARES["RedPajamaC4"]
    assert ratio == pytest.approx(3 * base)


def test_weights_file_and_missing_domain_errors(sp_prefixes, tmp_path):
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({"C4": 1.0, "CommonCrawl": 3.0}))
    plan = _plan(sp_prefixes, tmp_path, strategy="original", domain_weights=str(weights))
    d = _by_domain(plan)
    assert d["RedPajamaCommonCrawl"].target_share == pytest.approx(0.75)
    assert d["RedPajamaBook"].target_share == 0.0
    with pytest.raises(PlanError, match="RedPajamaC4.*has weight 0.2661 but no dataset"):
        _plan(sp_prefixes[:1], tmp_path, strategy="original")
    with pytest.raises(PlanError, match="--upweight: unknown domain"):
        _plan(sp_prefixes, tmp_path, strategy="domain-upsample", upweight={"Nope": 2.0})


def test_infeasible_budget_fails_clearly(tmp_path):
    empty = write_dataset(str(tmp_path / "e_text_document"), np.zeros(0, dtype=np.int64), "E")
    full = write_dataset(str(tmp_path / "f_text_document"), np.full(50, 100), "F")
    w = tmp_path / "w.json"
    w.write_text(json.dumps({"E": 0.5, "F": 0.5}))
    with pytest.raises(PlanError, match="E: the budget needs .* but the dataset has none"):
        _plan([empty, full], tmp_path, strategy="original", domain_weights=str(w))


def test_max_epochs_warning(sp_prefixes, tmp_path):
    plan = _plan(sp_prefixes, tmp_path, strategy="per-source", train_tokens=5e7, max_epochs=2)
    assert any("repeats" in w and "--max-epochs" in w for w in plan.warnings)


@pytest.mark.parametrize("kwargs,flag", [
    ({"strategy": "bogus"}, "--strategy"),
    ({"long_fraction": 1.5}, "--long-fraction"),
    ({"long_fraction": 0.5, "short_keep_ratio": 0.1}, "--short-keep-ratio"),
    ({"strategy": "original", "long_fraction": 0.5}, "--long-fraction"),
    ({"strategy": "domain-upsample"}, "--upweight"),
    ({"train_tokens": 0}, "--train-tokens"),
    ({"valid_fraction": 1.0}, "--valid-fraction"),
])
def test_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        MixtureConfig(data_prefixes=["x"], output_dir="o", **kwargs).validate()


def test_views_and_blend_files(sp_prefixes, tmp_path):
    plan = _plan(sp_prefixes, tmp_path, strategy="per-source", valid_fraction=0.1)
    paths = write_plan_outputs(plan, str(tmp_path / "out"))
    for name in ("mixture_plan.json", "blend.txt", "blend_per_split.json", "report.md",
                 "domain_shares.png", "long_shares.png", "length_cdf.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    words = Path(paths["blend"]).read_text().split()
    weights = [float(w) for w in words[0::2]]
    assert sum(weights) == pytest.approx(1.0)
    per_split = json.loads(Path(paths["per_split"]).read_text())
    assert per_split["train"] == words and per_split["test"] is None
    assert len(per_split["valid"]) == 2 * len(plan.domains)
    # A long view lists exactly the source's long train documents, tokens unchanged.
    views = planned_views(plan, str(tmp_path / "out" / "views"))  # what the writer wrote
    cc = next(v for v in views if v.domain == "RedPajamaCommonCrawl" and v.bucket == "long")
    src = next(d.prefix for d in plan.domains if d.domain == "RedPajamaCommonCrawl")
    src_index, view_index = read_index(src), read_index(cc.view)
    n_train = int(round(0.9 * (len(src_index.document_indices) - 1)))
    long_ids = np.nonzero(src_index.document_lengths()[:n_train] > 4096)[0]
    assert len(view_index.document_indices) - 1 == long_ids.size == cc.documents
    for j in (0, long_ids.size - 1):
        np.testing.assert_array_equal(read_document(cc.view, view_index, j),
                                      read_document(src, src_index, long_ids[j]))
    assert Path(cc.view + ".bin").is_symlink()


def test_cut_views_split_documents_into_pieces(tmp_path):
    lengths = np.array([10, 4096, 4097, 9000, 1])
    src = write_dataset(str(tmp_path / "c_text_document"), lengths, "C")
    plan = _plan([src], tmp_path, strategy="cut", domain_weights="natural", cut_length=4096,
                 train_tokens=1e5)
    write_plan_outputs(plan, str(tmp_path / "out"))
    view = planned_views(plan, str(tmp_path / "out" / "views"))[0].view
    index = read_index(view)
    pieces = index.document_lengths()
    assert pieces.tolist() == [10, 4096, 4096, 1, 4096, 4096, 808, 1]
    joined = np.concatenate([read_document(view, index, j) for j in range(len(pieces))])
    np.testing.assert_array_equal(joined, np.fromfile(src + ".bin", dtype=np.uint16))


def test_blend_file_loads_in_megatron_and_realizes_plan(sp_prefixes, tmp_path, single_rank_group):
    """Stock megatron-core on our blend file alone realizes the plan's bucket shares."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    from megatron_longctx.mixture.dataset import DatasetTokenizer

    plan = _plan(sp_prefixes, tmp_path, strategy="per-source", train_tokens=4e6,
                 seq_length=4096)
    paths = write_plan_outputs(plan, str(tmp_path / "out"))
    blend = get_blend_from_list(Path(paths["blend"]).read_text().split())
    config = GPTDatasetConfig(
        random_seed=1, sequence_length=4096, blend=blend, split="1,0,0",
        path_to_cache=str(tmp_path / "cache"), tokenizer=DatasetTokenizer(1000, 0),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [plan.train_samples, 0, 0], lambda: True, config).build()
    realized = np.bincount(train.dataset_index, minlength=len(blend[0])) / len(train)
    planned = np.array(blend[1]) / sum(blend[1])
    assert np.abs(realized - planned).max() < 0.01
    assert train[0]["tokens"].shape == (4096,)


def test_cli_runs_and_names_bad_flags(sp_prefixes, tmp_path):
    out = tmp_path / "cli"
    glob = str(Path(sp_prefixes[0]).parent / "sp_*_text_document")
    ok = subprocess.run(
        [sys.executable, str(REPO / "tools" / "blend_mixture.py"), "--data-prefix", glob,
         "--output-dir", str(out), "--train-tokens", "2e6", "--seq-length", "8192"],
        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "RedPajamaCommonCrawl" in ok.stdout and (out / "mixture_plan.json").exists()
    plan = load_plan(out / "mixture_plan.json")
    assert plan.parameters.data_prefixes == sorted(sp_prefixes)
    bad = subprocess.run(
        [sys.executable, str(REPO / "tools" / "blend_mixture.py"), "--data-prefix", glob,
         "--output-dir", str(out), "--long-fraction", "2"],
        capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "--long-fraction" in bad.stderr
    assert load_stats(sp_prefixes[0] + ".stats.json")["domain"]


def test_make_lengths_shapes():
    rng = np.random.default_rng(0)
    books = make_lengths(rng, "RedPajamaBook", 500_000)
    c4 = make_lengths(rng, "RedPajamaC4", 500_000)
    assert np.median(books) > 20 * np.median(c4)


# --------------------------------------------------------------------------------------------
# the typed plan contract, the held-out split, behaviour pinned across the refactor
# --------------------------------------------------------------------------------------------
#: Generated on the `sp_prefixes` fixture: per-source, long fraction 0.7, valid fraction 0.1,
#: 2e6 tokens at 8192. The typed plan kept format 1's numbers (commit ba75c04); format 3
#: computes them over the training part (held-out tail excluded), so the repeat factors rose
#: (CommonCrawl short 0.3488 -> 0.3938, Book long 0.353 -> 0.887: its held-out document is 60%
#: of its tokens), ArXiv's natural long share moved 0.98255 -> 0.98108 and with it two blend
#: weights; shares, views and held-out sets are unchanged.
PINNED_DOMAINS = [  # (domain, documents, target share, long share after, [repeat short, long])
    ("RedPajamaCommonCrawl", 869, 0.5337533753375338, 0.7,
     [0.393777343163282, 1.1463757656737568]),
    ("RedPajamaC4", 1872, 0.26612661266126614, 0.0, [0.7365858126924933, 0.0]),
    ("RedPajamaGithub", 115, 0.05000500050005001, 0.7, [0.3682886148826505, 1.1866598982976526]),
    ("RedPajamaBook", 6, 0.041504150415041505, 1.0, [0.0, 0.8867555558769243]),
    ("RedPajamaArXiv", 11, 0.0429042904290429, 0.9810833646263613,
     [0.6713025789999199, 0.6713025789999202]),
    ("RedPajamaWikipedia", 139, 0.034003400340034004, 0.7,
     [0.24637169670354309, 4.403363285176912]),
    ("RedPajamaStackExchange", 112, 0.0317031703170317, 0.0, [0.7128072199258417, 0.0]),
]
PINNED_BLEND_WEIGHTS = [
    "0.1601260126", "0.3736273627", "0.2661266127", "0.01500150015", "0.03500350035",
    "0.04150415042", "0.000811604818", "0.04209268561", "0.0102010201", "0.02380238024",
    "0.03170317032"]
PINNED_VIEWS = [  # (domain, bucket, documents, tokens)
    ("RedPajamaCommonCrawl", "short", 691, 813282), ("RedPajamaCommonCrawl", "long", 91, 651841),
    ("RedPajamaC4", "short", 1685, 722595), ("RedPajamaGithub", "short", 96, 81466),
    ("RedPajamaGithub", "long", 8, 58995), ("RedPajamaBook", "long", 5, 93609),
    ("RedPajamaArXiv", "short", 1, 2418), ("RedPajamaArXiv", "long", 9, 125406),
    ("RedPajamaWikipedia", "short", 123, 82810), ("RedPajamaWikipedia", "long", 2, 10811),
    ("RedPajamaStackExchange", "short", 101, 88953)]
PINNED_VALID_DOCUMENTS = [87, 187, 11, 1, 1, 14, 11]


def test_plan_numbers_blend_and_views_pinned(sp_prefixes, tmp_path):
    plan = _plan(sp_prefixes, tmp_path, strategy="per-source", long_fraction=0.7,
                 valid_fraction=0.1)
    paths = write_plan_outputs(plan, str(tmp_path / "out"))
    assert plan.train_samples == 245
    assert plan.totals.unique_tokens == 3123184
    assert plan.totals.long_share_before == pytest.approx(0.34599572196262707, rel=1e-12)
    assert plan.totals.long_share_after == pytest.approx(0.516030079350406, rel=1e-12)
    assert plan.totals.max_repeat == pytest.approx(4.403363285176912, rel=1e-12)
    got = [(d.domain, d.documents, d.target_share, d.long_share_after, d.repeats)
           for d in plan.domains]
    assert [g[:2] for g in got] == [p[:2] for p in PINNED_DOMAINS]
    for g, p in zip(got, PINNED_DOMAINS):
        assert g[2:4] == pytest.approx(p[2:4], rel=1e-12)
        assert g[4] == pytest.approx(p[4], rel=1e-12)
    assert Path(paths["blend"]).read_text().split()[0::2] == PINNED_BLEND_WEIGHTS
    views = planned_views(plan, str(tmp_path / "out" / "views"))
    assert [(v.domain, v.bucket, v.documents, v.tokens) for v in views
            if v.bucket != "valid"] == PINNED_VIEWS
    valid = json.loads(Path(paths["per_split"]).read_text())["valid"]
    assert [len(read_index(p).document_lengths()) for p in valid[1::2]] == \
        PINNED_VALID_DOCUMENTS == [d.held_out_documents for d in plan.domains]
    for d, v in zip(plan.domains, valid[1::2]):  # held-out counts are the valid views' own
        assert d.held_out_tokens == int(read_index(v).document_lengths().sum())
        for b in d.buckets:
            assert b.repeat * b.train_unique_tokens == pytest.approx(b.target_tokens)
    # The file round-trips to an equal typed plan (and holds no `realization`).
    loaded = load_plan(paths["plan"])
    assert loaded == plan and loaded.source == paths["plan"]
    assert "realization" not in json.loads(Path(paths["plan"]).read_text())


def test_held_out_count_and_split_string():
    from megatron_longctx.mixture.plan import held_out_count, split_documents, split_string

    assert held_out_count(40_000, 5e-5) == 2 and held_out_count(869, 0.1) == 87
    assert held_out_count(10, 0.0) == 0
    assert held_out_count(115, 0.1) == 11  # an exact half: megatron's rule, as format 1 held out
    train, held = split_documents(40_000, 5e-5)
    assert train.size == 39_998 and held.tolist() == [39_998, 39_999]
    assert split_string(0.05) == "0.95,0.05,0"  # unchanged: same megatron cache keys
    assert "e" not in split_string(5e-5)  # megatron's parser reads digits and dots only
    with pytest.raises(ValueError, match="--valid-fraction"):
        held_out_count(10, 1.0)


def test_tiny_valid_fraction_holds_out_round_f_times_n(tmp_path):
    """--valid-fraction 5e-5 wrote split `5e-05`, parsed as 5 and 05: 91% held out."""
    src = write_dataset(str(tmp_path / "t_text_document"), np.full(40_000, 3), "T")
    plan = _plan([src], tmp_path, strategy="original", domain_weights="natural",
                 valid_fraction=5e-5, train_tokens=1e4, seq_length=64)
    paths = write_plan_outputs(plan, str(tmp_path / "out"))
    per_split = json.loads(Path(paths["per_split"]).read_text())
    assert len(read_index(per_split["valid"][1]).document_lengths()) == 2  # round(5e-5 * 4e4)
    train_docs = sum(len(read_index(p).document_lengths()) for p in per_split["train"][1::2])
    assert train_docs == 39_998


def _valid_plan_json(sp_prefixes, tmp_path) -> tuple[dict, Path]:
    plan = _plan(sp_prefixes[:1], tmp_path, strategy="original", domain_weights="natural")
    path = tmp_path / "mixture_plan.json"
    plan.save(path)
    return json.loads(path.read_text()), path


@pytest.mark.parametrize("edit,message", [
    (lambda p: p["domains"][0]["buckets"][1].update(repeat=-1),
     r"mixture_plan.json: domains\[0\].buckets\[1\].repeat: must be >= 0, got -1"),
    (lambda p: p["domains"][0]["buckets"][0].pop("target_tokens"),
     r"domains\[0\].buckets\[0\].target_tokens: missing"),
    (lambda p: p["domains"][0].update(target_share="half"),
     r"domains\[0\].target_share: must be a number"),
    (lambda p: p.update(format="megatron_longctx.mixture_plan/1"),
     r"format: expected .*re-run tools/blend_mixture.py"),
    (lambda p: p["parameters"].update(valid_fraction=2.0),
     r"mixture_plan.json: parameters: --valid-fraction must be in \[0, 1\)"),
    (lambda p: p["tokenizer"].pop("eod"), r"tokenizer.eod: missing"),
    (lambda p: p.update(strategy="bogus"), r"strategy: must be one of"),
])
def test_plan_file_validation_names_file_and_field(sp_prefixes, tmp_path, edit, message):
    data, path = _valid_plan_json(sp_prefixes, tmp_path)
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_plan(path)


def test_plan_save_is_atomic(sp_prefixes, tmp_path, monkeypatch):
    """A crash while writing leaves the previous plan file whole and no temporary behind."""
    plan = _plan(sp_prefixes[:1], tmp_path, strategy="original", domain_weights="natural")
    path = tmp_path / "mixture_plan.json"
    plan.save(path)
    before = path.read_bytes()

    def crash(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        plan.save(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "mixture_plan.json"]


def test_audit_with_a_budget_too_small_is_one_clear_line(tmp_path):
    """A 2K-token plan on a small corpus raised a traceback about
    'train split has no documents' (every bucket's repeat x documents rounds to 0)."""
    prefixes = make_slimpajama_like(tmp_path / "sp", total_tokens=300_000, seed=1)
    out = tmp_path / "mix"
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "blend_mixture.py"), "--data-prefix", *prefixes,
         "--output-dir", str(out), "--train-tokens", "2048", "--seq-length", "2048",
         "--long-threshold", "1024", "--audit"],
        capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    error = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "--train-tokens" in error[0] and "keeps none" in error[0]
