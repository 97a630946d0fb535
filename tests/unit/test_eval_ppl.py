"""Loss by position and domain: bucket edges, token-weighted sums that add up to the
whole-document loss, held-out document selection (data paths and mixture plans), JSON + plot,
and the CLI end to end on a tiny HF directory and its converted checkpoint (equal losses)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from megatron_longctx.eval.ppl import (
    DocumentSource,
    bucket_label,
    default_bucket_edges,
    parse_bucket_edges,
    position_bucket_sums,
    run_ppl,
    select_documents,
    sources_from_data_paths,
    sources_from_mixture_plan,
)
from tests.unit.test_eval_needle import _cli, make_tiny_hf, trained_checkpoint


def write_dataset(prefix: Path, lengths: list[int], vocab: int, seed: int = 0) -> str:
    from megatron_longctx.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(str(prefix), np.uint16)
    writer.add_documents(rng.integers(0, vocab, size=sum(lengths)), np.array(lengths),
                         np.ones(len(lengths), dtype=np.int64))
    writer.finalize()
    return str(prefix)


class PositionModel:
    """Fake model: the loss of position j is 1/j (so every bucket mean is known)."""

    vocab_size = 1000

    def describe(self) -> dict:
        return {"kind": "fake", "path": "/fake"}

    def token_losses(self, ids):
        return 1.0 / np.arange(1, len(ids))


def test_bucket_edges() -> None:
    assert default_bucket_edges(131072) == [0, 1024, 4096, 16384, 32768, 65536, 131072]
    assert default_bucket_edges(100000) == [0, 1024, 4096, 16384, 32768, 65536, 100000]
    assert default_bucket_edges(2048) == [0, 1024, 2048]
    assert default_bucket_edges(512) == [0, 512]
    assert parse_bucket_edges("0,256,1024,4096", 2048) == [0, 256, 1024, 2048]
    assert parse_bucket_edges(None, 40000) == [0, 1024, 4096, 16384, 32768, 40000]
    for bad in ("1,2", "0,5,5", "0,x"):
        with pytest.raises(ValueError, match="--buckets"):
            parse_bucket_edges(bad, 100)
    assert [bucket_label(a, b) for a, b in ((0, 1024), (1024, 4096), (300, 600))] == [
        "0-1K", "1K-4K", "300-600"]


def test_bucket_sums_add_up_to_the_document_loss() -> None:
    rng = np.random.default_rng(0)
    losses = rng.gamma(2.0, 1.5, size=2999)  # positions 1..2999
    edges = [0, 100, 1024, 2048, 3000]
    sums, counts = position_bucket_sums(losses, edges)
    assert counts.tolist() == [99, 924, 1024, 952]  # position 0 has no loss
    means = sums / counts
    assert np.sum(means * counts) / counts.sum() == pytest.approx(losses.mean(), rel=1e-12)
    assert means[0] == pytest.approx(losses[:99].mean())
    assert means[3] == pytest.approx(losses[2047:].mean())


def test_held_out_documents_from_plan_and_data_paths(tmp_path) -> None:
    import dataclasses

    from tests.unit.mixture_fixtures import hand_made_plan

    book = write_dataset(tmp_path / "sp_RedPajamaBook_text_document",
                         [50, 400, 30, 500, 600, 20, 450, 700], vocab=500)
    c4 = write_dataset(tmp_path / "sp_RedPajamaC4_text_document", [10, 20, 30, 40], vocab=500)
    plan = hand_made_plan([("RedPajamaBook", book, 8), ("RedPajamaC4", c4, 4)], 0.5)
    plan.save(tmp_path / "plan.json")
    sources = sources_from_mixture_plan(tmp_path / "plan.json")
    assert [s.domain for s in sources] == ["RedPajamaBook", "RedPajamaC4"]
    assert sources[0].documents.tolist() == [4, 5, 6, 7]  # the held-out half
    docs = select_documents(sources, seq_length=512, min_length=400, max_docs_per_domain=2)
    assert [(d.domain, d.index, d.length, len(d.tokens)) for d in docs] == [
        ("RedPajamaBook", 4, 600, 512), ("RedPajamaBook", 6, 450, 450)]
    dataclasses.replace(plan, parameters=dataclasses.replace(plan.parameters,
                                                              valid_fraction=0.0)
                        ).save(tmp_path / "plan.json")
    with pytest.raises(ValueError, match="held out"):
        sources_from_mixture_plan(tmp_path / "plan.json")

    every = sources_from_data_paths(["0.3", book, "0.7", c4])  # Megatron's weighted form
    assert [s.domain for s in every] == ["sp_RedPajamaBook", "sp_RedPajamaC4"]
    assert every[0].documents.tolist() == list(range(8))
    assert sources_from_data_paths([book], 0.25)[0].documents.tolist() == [6, 7]


def test_run_ppl_with_known_losses(tmp_path) -> None:
    prefix = write_dataset(tmp_path / "d_text_document", [300, 40, 300], vocab=100)
    source = DocumentSource("d", prefix, np.arange(3))
    result = run_ppl(PositionModel(), [source], tmp_path / "out", seq_length=256,
                     edges=[0, 16, 256], max_docs_per_domain=5, log=None)
    inv = 1.0 / np.arange(1, 256)
    first, second = result["buckets"]
    assert first["tokens"] == 2 * 15 and first["loss"] == pytest.approx(inv[:15].mean())
    assert second["tokens"] == 2 * 240 and second["loss"] == pytest.approx(inv[15:].mean())
    assert second["ppl"] == pytest.approx(math.exp(second["loss"]))
    assert result["overall"]["loss"] == pytest.approx(inv.mean())
    assert result["domains"]["d"]["documents"] == 2  # the 40-token document is too short
    assert [d["index"] for d in result["documents"]] == [0, 2]
    on_disk = json.loads((tmp_path / "out" / "ppl.json").read_text())
    assert on_disk["settings"]["bucket_edges"] == [0, 16, 256]
    assert (tmp_path / "out" / "loss_by_position.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="no candidate"):
        run_ppl(PositionModel(), [source], tmp_path / "out", seq_length=1000, log=None)


def test_cli_end_to_end_hf_and_converted_checkpoint_agree(hf_tokenizer_dir, tmp_path,
                                                          tmp_path_factory, capsys) -> None:
    """The same weights as an HF directory and as our checkpoint give the same losses per
    bucket; bucket losses (token-weighted) average to the overall loss; a trainer checkpoint
    runs too."""
    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron

    cli = _cli("eval_ppl")
    hf = make_tiny_hf(tmp_path / "hf", hf_tokenizer_dir, seed=1)
    ours = convert_hf_to_megatron(hf, tmp_path / "ours")
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    prefixes = [write_dataset(tmp_path / f"sp_{name}_text_document", lengths, vocab, seed)
                for seed, (name, lengths) in enumerate(
                    (("Book", [700, 100, 520, 600]), ("C4", [90, 513, 800])))]
    results = {}
    trained = trained_checkpoint(tmp_path_factory, hf_tokenizer_dir)
    for name, model in (("hf", hf), ("ours", ours), ("trained", trained)):
        out = tmp_path / f"ppl-{name}"
        assert cli.main(["--model", str(model), "--data-path", *prefixes, "--seq-length", "512",
                         "--buckets", "0,64,256", "--output-dir", str(out),
                         "--num-threads", "1"]) == 0
        results[name] = json.loads((out / "ppl.json").read_text())
        assert (out / "loss_by_position.png").is_file()
    assert "all: loss" in capsys.readouterr().out
    assert results["trained"]["model"]["training_length"] == 64
    hf_res, ours_res = results["hf"], results["ours"]
    assert hf_res["overall"]["tokens"] == 5 * 511
    assert {d: v["documents"] for d, v in hf_res["domains"].items()} == {"sp_Book": 3,
                                                                         "sp_C4": 2}
    for a, b in zip(hf_res["buckets"], ours_res["buckets"]):
        assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) < 1e-4
    for res in results.values():
        weighted = sum(b["loss"] * b["tokens"] for b in res["buckets"]) / sum(
            b["tokens"] for b in res["buckets"])
        assert weighted == pytest.approx(res["overall"]["loss"], rel=1e-12)
        doc_mean = np.mean([d["loss"] for d in res["documents"]])  # all docs 511 tokens
        assert doc_mean == pytest.approx(res["overall"]["loss"], rel=1e-9)
    assert cli.main(["--model", str(hf), "--output-dir", str(tmp_path / "x")]) == 2
    assert "exactly one" in capsys.readouterr().err
