"""The training-side dataset realizes the plan: audit within 1%, cache keys, boundaries, cut."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_longctx.config.mixture import MixtureConfig
from megatron_longctx.mixture.audit import (
    audit_datasets,
    document_repeats,
    format_audit,
    sample_bucket_tokens,
)
from megatron_longctx.mixture.dataset import DatasetTokenizer, build_plan_datasets
from megatron_longctx.mixture.outputs import write_plan_outputs
from megatron_longctx.mixture.plan import MixturePlan, load_plan
from megatron_longctx.mixture.planner import plan_mixture
from tests.unit.mixture_fixtures import EOD, VOCAB, make_slimpajama_like, write_dataset

TOKENIZER = DatasetTokenizer(VOCAB, EOD)


@pytest.fixture(scope="module")
def sp_prefixes(tmp_path_factory) -> list[str]:
    return make_slimpajama_like(tmp_path_factory.mktemp("spd"), total_tokens=4_000_000, seed=3)


def _plan(prefixes, out, **kw) -> MixturePlan:
    """Plan, write, and load back: the trainer's route (a `cut` plan finds its views/ so)."""
    kw.setdefault("train_tokens", 6e6)
    kw.setdefault("seq_length", 4096)
    plan = plan_mixture(MixtureConfig(data_prefixes=prefixes, output_dir=str(out), **kw))
    return load_plan(write_plan_outputs(plan, str(out))["plan"])


def _build(plan, cache, **kw):
    train, _, _ = build_plan_datasets(plan, TOKENIZER, (plan.train_samples, 0, 0),
                                      cache_dir=str(cache), **kw)
    return train


@pytest.mark.parametrize("strategy,kw", [
    ("per-source", {"long_fraction": 0.7}),
    ("global", {"long_fraction": 0.6}),
    ("original", {}),
])
def test_realized_shares_match_plan_within_one_percent(sp_prefixes, tmp_path, strategy, kw,
                                                        single_rank_group):
    plan = _plan(sp_prefixes, tmp_path / "plan", strategy=strategy, **kw)
    result = audit_datasets(plan, _build(plan, tmp_path / "cache"))
    assert result["within_tolerance"], format_audit(result)
    # Not trivially true: the long buckets really carry most of CommonCrawl's tokens.
    cc_long = next(r for r in result["rows"]
                   if r["domain"] == "RedPajamaCommonCrawl" and r["bucket"] == "long")
    if strategy == "per-source":
        assert cc_long["realized"] > 0.3


def test_audit_detects_a_wrong_realization(sp_prefixes, tmp_path, single_rank_group):
    """Audit the original mixture's dataset against the per-source plan: must fail."""
    upsampled = _plan(sp_prefixes, tmp_path / "a", strategy="per-source", long_fraction=0.8)
    natural = _plan(sp_prefixes, tmp_path / "b", strategy="original")
    result = audit_datasets(upsampled, _build(natural, tmp_path / "cache"))
    assert not result["within_tolerance"]


def test_changed_plan_never_reuses_a_stale_cache(sp_prefixes, tmp_path, single_rank_group):
    cache = tmp_path / "cache"
    a = _plan(sp_prefixes, tmp_path / "a", strategy="per-source", long_fraction=0.6)
    b = _plan(sp_prefixes, tmp_path / "b", strategy="per-source", long_fraction=0.9)
    da, db = _build(a, cache), _build(b, cache)
    ha = {d.unique_description_hash for d in da.datasets}
    hb = {d.unique_description_hash for d in db.datasets}
    assert not ha & hb
    again = _build(a, cache)  # same plan: same cached indices
    for x, y in zip(da.datasets, again.datasets):
        np.testing.assert_array_equal(x.document_index, y.document_index)
    for x, y in zip(da.datasets, db.datasets):
        if "CommonCrawl" in x.dataset_path:
            lx = (x.dataset.sequence_lengths[x.document_index] > 4096).mean()
            ly = (y.dataset.sequence_lengths[y.document_index] > 4096).mean()
            assert ly > lx  # b upsamples long documents more


def test_deterministic_for_a_seed(sp_prefixes, tmp_path, single_rank_group):
    plan = _plan(sp_prefixes, tmp_path / "p", strategy="per-source")
    one, two = _build(plan, tmp_path / "c1"), _build(plan, tmp_path / "c2")
    for x, y in zip(one.datasets, two.datasets):
        np.testing.assert_array_equal(x.document_index, y.document_index)
        np.testing.assert_array_equal(x.shuffle_index, y.shuffle_index)
    other = build_plan_datasets(plan, TOKENIZER, (plan.train_samples, 0, 0), seed=99,
                                cache_dir=str(tmp_path / "c3"))[0]
    assert any(not np.array_equal(x.document_index, y.document_index)
               for x, y in zip(one.datasets, other.datasets))


def test_segment_ids_mark_document_boundaries(sp_prefixes, tmp_path, single_rank_group):
    plan = _plan(sp_prefixes, tmp_path / "p", strategy="per-source")
    train = _build(plan, tmp_path / "cache", return_document_boundaries=True)
    checked = 0
    for i in range(0, len(train), max(1, len(train) // 25)):
        sample = train[i]
        assert "attention_mask" not in sample  # never a dense s x s mask
        tokens, seg = sample["tokens"].numpy(), sample["segment_ids"].numpy()
        assert seg.shape == tokens.shape and seg[0] == 0 and np.all(np.diff(seg) >= 0)
        starts = np.flatnonzero(np.diff(seg)) + 1
        # Every document ends with EOD in the fixture: the token before a boundary is EOD.
        assert np.all(tokens[starts - 1] == EOD)
        # And EOD only appears at boundaries (fixture tokens are 1..VOCAB-1 inside documents).
        eod_pos = np.flatnonzero(tokens == EOD)
        assert set(eod_pos + 1) - {len(tokens)} == set(starts)
        checked += starts.size
    assert checked > 10


def test_cut_plan_never_packs_more_than_cut_length_of_one_document(tmp_path,
                                                                  single_rank_group):
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 20_000, size=300)
    src = write_dataset(str(tmp_path / "long_text_document"), lengths, "Long")
    plan = _plan([src], tmp_path / "p", strategy="cut", cut_length=1024,
                 domain_weights="natural", train_tokens=2e6, seq_length=4096)
    train = _build(plan, tmp_path / "cache", return_document_boundaries=True)
    ds = train.datasets[0] if hasattr(train, "datasets") else train
    longest = max(int(ds.part_lengths(i).max()) for i in range(len(ds)))
    assert longest <= 1024 + 1  # + the overlapping extra token of the next sample
    assert longest > 512


def test_sample_bucket_tokens_matches_brute_force(sp_prefixes, tmp_path, single_rank_group):
    plan = _plan(sp_prefixes, tmp_path / "p", strategy="per-source")
    train = _build(plan, tmp_path / "cache")
    ds = train.datasets[0]
    ids = np.arange(min(len(ds), 40))
    fast = sample_bucket_tokens(ds, ids, 4096)
    for k, i in enumerate(ids):
        parts = ds.part_lengths(int(i))
        parts[-1] -= 1  # drop the extra token shared with the next sample
        row = ds.shuffle_index[i]
        d0, d1 = ds.sample_index[row][0], ds.sample_index[row + 1][0]
        docs = ds.document_index[d0 : d0 + parts.size]
        assert parts.size == d1 - d0 + 1
        slow = sum(int(p) for p, d in zip(parts, docs) if ds.dataset.sequence_lengths[d] > 4096)
        assert fast[k] == slow


@pytest.mark.parametrize("strategy,kw", [("per-source", {"long_fraction": 0.9}),
                                         ("per-source", {"short_keep_ratio": 0.1}),
                                         ("cut", {"cut_length": 1024})])
def test_document_repeats_match_brute_force(sp_prefixes, tmp_path, strategy, kw,
                                            single_rank_group):
    """Times each document is trained on, against a walk over every drawn sample's document
    parts (megatron's sample index read through the dataset); the audit reports the maximum."""
    plan = _plan(sp_prefixes, tmp_path / "p", strategy=strategy, **kw)
    train = _build(plan, tmp_path / "cache")
    audit = audit_datasets(plan, train)
    for k, ds in enumerate(train.datasets):
        ids = train.dataset_sample_index[train.dataset_index == k]
        fast = document_repeats(ds, ids)
        tokens = np.zeros(len(ds.dataset.sequence_lengths))
        for i in ids:
            parts = ds.part_lengths(int(i)).astype(np.int64)
            parts[-1] -= 1  # the extra token belongs to the next sample
            row = ds.shuffle_index[i]
            d0 = ds.sample_index[row][0]
            np.add.at(tokens, ds.document_index[d0 : d0 + parts.size], parts)
        slow = tokens / ds.dataset.sequence_lengths
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-9)
        domain = next(r["domain"] for r in audit["rows"][3 * k : 3 * k + 1])
        assert audit["max_document_repeats"][domain] == pytest.approx(slow.max())
    assert max(audit["max_document_repeats"].values()) > 1.0  # upsampling repeats documents
    assert "most repeated document" in format_audit(audit)


def test_held_out_split_with_zero_requested_samples_is_skipped(sp_prefixes, tmp_path,
                                                               single_rank_group):
    """Regression: megatron loops forever building a non-empty split asked for 0 samples."""
    import signal

    def timeout(*_):
        raise TimeoutError("building a 0-sample split did not terminate")

    plan = _plan(sp_prefixes, tmp_path / "p", strategy="per-source", valid_fraction=0.05)
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    try:
        train, valid, test = build_plan_datasets(plan, TOKENIZER, (plan.train_samples, 0, 0),
                                                 cache_dir=str(tmp_path / "cache"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert valid is None and test is None
    assert audit_datasets(plan, train)["within_tolerance"]
    # the held-out tail is really excluded from training documents
    for ds in train.datasets:
        n_docs = len(ds.dataset.document_indices) - 1
        assert ds.document_index.max() < int(round(0.95 * n_docs))


# --------------------------------------------------------------------------------------------
# same samples as before the refactor; the held-out split; --eod-mask-loss
# --------------------------------------------------------------------------------------------
def _digest(train, valid) -> tuple[str, str]:
    """sha256 of every index array of the train blend, every 97th sample, all valid samples."""
    import hashlib

    h = hashlib.sha256()
    for ds in train.datasets:
        for array in (ds.document_index, ds.shuffle_index, ds.sample_index):
            h.update(array.tobytes())
    h.update(np.asarray(train.dataset_index).tobytes())
    h.update(np.asarray(train.dataset_sample_index).tobytes())
    for i in range(0, len(train), 97):
        h.update(train[i]["tokens"].numpy().tobytes())
    hv = hashlib.sha256()
    for i in range(len(valid) if valid is not None else 0):
        hv.update(valid[i]["tokens"].numpy().tobytes())
    return h.hexdigest(), hv.hexdigest()


EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("strategy,kw,digest", [
    # Generated with the code of commit ba75c04; per-source re-pinned when repeats moved to
    # the training part (at valid fraction 0.05 each bucket's repeat
    # rises by ~1/0.95, so the upsampled document lists differ; sample count unchanged; `cut`
    # already repeated over its training-only views and is unchanged).
    ("per-source", {}, "d8a558cc30034d02ccc0e32bcfe883fbad13db6e3aea660e969d78a4e0eb8b9c"),
    ("cut", {"cut_length": 1024, "domain_weights": "natural"},
     "016932a059a97645225d5cd4bd6c68542166f2cf8077dc6a27ed1c95acf722ba"),
])
def test_training_samples_pinned(sp_prefixes, tmp_path, strategy, kw, digest,
                                 single_rank_group):
    plan = _plan(sp_prefixes, tmp_path / "p", strategy=strategy, valid_fraction=0.05, **kw)
    train, valid, _ = build_plan_datasets(plan, TOKENIZER, (plan.train_samples, 0, 0),
                                          cache_dir=str(tmp_path / "cache"))
    assert len(train) == {"per-source": 1467, "cut": 1469}[strategy]
    assert _digest(train, valid) == (digest, EMPTY)


def test_validation_samples_pinned(tmp_path, single_rank_group):
    prefixes = make_slimpajama_like(tmp_path / "sp", total_tokens=600_000, seed=5,
                                    domains=["RedPajamaCommonCrawl", "RedPajamaC4",
                                             "RedPajamaWikipedia"])
    plan = _plan(prefixes, tmp_path / "p", strategy="per-source", valid_fraction=0.05,
                 domain_weights="natural", train_tokens=2e5, seq_length=256, long_threshold=128)
    train, valid, _ = build_plan_datasets(plan, TOKENIZER, (plan.train_samples, 8, 0),
                                          cache_dir=str(tmp_path / "cache"))
    assert len(train) == 783
    assert _digest(train, valid) == (
        # training samples re-pinned (repeats over the training part); the held-out
        # samples are unchanged.
        "c8a511aa785d08d00e867f0b8973f914a8fce705eb15c617f6f46097adcd3b34",
        "c84ed738652635405b0b3d8b2dbadad0d2b21d5520e7903d2f239ca826c79b7a")


def test_tiny_valid_fraction_trains_on_all_but_round_f_times_n(tmp_path, single_rank_group):
    """At --valid-fraction 5e-5 megatron read the split `5e-05` as 5 and 05 and the
    trainer kept only 9% of the documents; now the last round(5e-5 * n) documents are held out."""
    src = write_dataset(str(tmp_path / "t_text_document"), np.full(40_000, 3), "T")
    plan = _plan([src], tmp_path / "p", strategy="original", domain_weights="natural",
                 valid_fraction=5e-5, train_tokens=1.3e5, seq_length=64)  # repeat ~1.08
    train, valid, _ = build_plan_datasets(plan, TOKENIZER, (plan.train_samples, 1, 0),
                                          cache_dir=str(tmp_path / "cache"))
    ds = train.datasets[0] if hasattr(train, "datasets") else train
    np.testing.assert_array_equal(np.unique(ds.document_index), np.arange(39_998))
    held = valid.datasets[0] if hasattr(valid, "datasets") else valid
    assert sorted(set(held.document_index.tolist())) == [39_998, 39_999]


def test_eod_mask_loss_applies_to_plan_datasets(sp_prefixes, tmp_path, single_rank_group):
    """The plan dataset hard-coded eod_mask_loss=False."""
    plan = _plan(sp_prefixes, tmp_path / "p", strategy="per-source")
    for masked in (False, True):
        train, _, _ = build_plan_datasets(plan, TOKENIZER, (plan.train_samples, 0, 0),
                                          cache_dir=str(tmp_path / "cache"),
                                          eod_mask_loss=masked)
        samples = [train[i] for i in range(8)]
        tokens = np.concatenate([x["tokens"].numpy() for x in samples])
        loss_mask = np.concatenate([x["loss_mask"].numpy() for x in samples])
        at_eod = tokens == EOD  # megatron masks the loss where the input token is EOD
        assert at_eod.any() and loss_mask[~at_eod].all()
        assert (loss_mask[at_eod] == 0).all() if masked else loss_mask[at_eod].all()


def test_audit_process_group_store_is_not_a_mktemp_name(tmp_path):
    """The audit's gloo store name came from the racy `tempfile.mktemp`."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import tempfile, torch.distributed as dist\n"
        "def racy(*a, **k): raise AssertionError('tempfile.mktemp is racy')\n"
        "tempfile.mktemp = racy\n"
        "from megatron_longctx.mixture.audit import ensure_process_group\n"
        "ensure_process_group(); assert dist.is_initialized(); print('ok')\n"
    )
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=repo, env={"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    stores = list(tmp_path.glob("mlc-pg-*"))
    assert len(stores) == 1 and stores[0].is_dir()
    assert stores[0].stat().st_mode & 0o077 == 0  # private to this user
