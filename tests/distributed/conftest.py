"""Fixtures shared by the trainer tests."""

from __future__ import annotations

import pytest

from tests.distributed.trainer_harness import make_init_checkpoint


@pytest.fixture(scope="session")
def init_ckpt(tmp_path_factory):
    """The tiny LLaMA's initial weights as a model-only checkpoint (one TP1 process): every
    trainer run starts from it, whatever its layout."""
    return make_init_checkpoint(tmp_path_factory.mktemp("init"))
