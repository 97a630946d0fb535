"""The trainer on real indexed data: a mixture plan (per-domain loss, validation) and a
Megatron `--data-path` blend; TensorBoard gets Megatron's `lm loss` tag every iteration."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_longctx.config.mixture import MixtureConfig
from megatron_longctx.config.model import ParallelConfig
from megatron_longctx.config.training import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    OptimConfig,
    PretrainConfig,
    TrainingConfig,
)
from megatron_longctx.mixture.outputs import write_plan_outputs
from megatron_longctx.mixture.planner import plan_mixture
from tests.distributed.trainer_harness import tiny_model, train
from tests.unit.mixture_fixtures import make_slimpajama_like


def scalars(logdir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    # Short-document domains: every one keeps held-out documents at valid_fraction 0.05.
    return make_slimpajama_like(tmp_path_factory.mktemp("sp"), total_tokens=600_000, seed=5,
                                domains=["RedPajamaCommonCrawl", "RedPajamaC4",
                                         "RedPajamaWikipedia"])


def config(data: DataConfig, tb: str, world_cp: int = 1) -> PretrainConfig:
    return PretrainConfig(
        model=dataclasses.replace(tiny_model(), seq_length=256, max_position_embeddings=256),
        parallel=ParallelConfig(context_parallel_size=world_cp),
        data=data,
        optim=OptimConfig(lr=1e-3),
        training=TrainingConfig(micro_batch_size=2, global_batch_size=4, train_iters=3,
                                eval_interval=2, eval_iters=1),
        checkpoint=CheckpointConfig(),
        logging=LoggingConfig(tensorboard_dir=tb),
    )


def test_mixture_plan_per_domain_loss_and_validation(prefixes, tmp_path):
    plan = plan_mixture(MixtureConfig(data_prefixes=prefixes, output_dir=str(tmp_path / "plan"),
                                      train_tokens=50_000, seq_length=256, long_threshold=128,
                                      valid_fraction=0.05, domain_weights="natural"))
    write_plan_outputs(plan, str(tmp_path / "plan"))
    tb = str(tmp_path / "tb")
    data = DataConfig(mixture_plan=str(tmp_path / "plan" / "mixture_plan.json"),
                      reset_attention_mask=True)
    result = train(config(data, tb, world_cp=2), 2)
    assert result["iteration"] == 3
    values = scalars(tb)
    assert len(values["lm loss"]) == 3 and values["lm loss"] == pytest.approx(result["losses"])
    assert len(values["lm loss validation"]) == 1
    domains = [t for t in values if t.startswith("lm loss/")]
    assert domains, sorted(values)
    assert {t.split("/", 1)[1] for t in domains} <= {d.domain for d in plan.domains}
    for tag in ("learning-rate", "grad-norm", "tokens-per-second", "iteration-time"):
        assert len(values[tag]) == 3


def test_data_path_blend(prefixes, tmp_path):
    tb = str(tmp_path / "tb")
    data = DataConfig(data_path=["0.7", prefixes[0], "0.3", prefixes[1]], split="98,2,0",
                      tokenizer_type="NullTokenizer", vocab_size=1000)
    result = train(config(data, tb), 1)
    assert result["iteration"] == 3 and all(x == x for x in result["losses"])
    assert len(scalars(tb)["lm loss"]) == 3


def test_empty_held_out_split_is_a_clear_error(tmp_path):
    """A domain whose held-out share rounds to 0 documents: megatron would loop forever."""
    prefixes = make_slimpajama_like(tmp_path / "sp", total_tokens=300_000, seed=6,
                                    domains=["RedPajamaC4", "RedPajamaBook"])
    plan = plan_mixture(MixtureConfig(data_prefixes=prefixes, output_dir=str(tmp_path / "plan"),
                                      train_tokens=50_000, seq_length=256, long_threshold=128,
                                      valid_fraction=0.01, domain_weights="natural"))
    write_plan_outputs(plan, str(tmp_path / "plan"))
    data = DataConfig(mixture_plan=str(tmp_path / "plan" / "mixture_plan.json"))
    with pytest.raises(RuntimeError, match="valid split has no documents"):
        train(config(data, str(tmp_path / "tb")), 1)


def test_eod_mask_loss_reaches_the_plan_dataset(prefixes, tmp_path, single_rank_group):
    """`--eod-mask-loss` was ignored with `--mixture-plan` (hard-coded off)."""
    import numpy as np

    from megatron_longctx.training.data import build_datasets
    from tests.unit.mixture_fixtures import EOD

    plan = plan_mixture(MixtureConfig(data_prefixes=prefixes, output_dir=str(tmp_path / "plan"),
                                      train_tokens=50_000, seq_length=256, long_threshold=128,
                                      domain_weights="natural"))
    write_plan_outputs(plan, str(tmp_path / "plan"))
    data = DataConfig(mixture_plan=str(tmp_path / "plan" / "mixture_plan.json"),
                      eod_mask_loss=True)
    built = build_datasets(config(data, str(tmp_path / "tb")), 1)
    assert built.tokenizer.eod == EOD
    samples = [built.train[i] for i in range(8)]
    tokens = np.concatenate([x["tokens"].numpy() for x in samples])
    loss_mask = np.concatenate([x["loss_mask"].numpy() for x in samples])
    assert (tokens == EOD).any()
    assert (loss_mask[tokens == EOD] == 0).all() and loss_mask[tokens != EOD].all()
