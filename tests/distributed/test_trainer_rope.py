"""The real trainer with each trainable RoPE scheme (CPU, one process, fp32 and bf16: every
real run's precision): it trains 4 steps, the checkpoint records the scheme, and resuming
from the iteration-2 checkpoint reproduces iterations 3-4 bit for bit (losses and weights).

The tiny model trains at 64 tokens with an original length of 32, so the length-dependent
schemes run in their extended regime (dynamic: the base for 64 tokens; longrope: long factors).
"""

from __future__ import annotations

import dataclasses

import pytest

from megatron_longctx.checkpoint.meta import iter_dir, read_meta
from megatron_longctx.config.model import ModelConfig
from tests.distributed.trainer_harness import final_weights, make_config, max_weight_diff, train

PAIRS = 8
TRAINABLE = {
    "linear": {"rope_type": "linear", "rope_scaling_factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_scaling_factor": 4.0,
                "rope_original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "rope_scaling_factor": 4.0,
             "rope_original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "rope_scaling_factor": 8.0, "rope_low_freq_factor": 2.0,
               "rope_high_freq_factor": 6.0, "rope_original_max_position_embeddings": 32},
    "longrope": {"rope_type": "longrope", "rope_original_max_position_embeddings": 32,
                 "longrope_short_factor": tuple(1.0 + 0.05 * i for i in range(PAIRS)),
                 "longrope_long_factor": tuple(1.5 + 0.6 * i for i in range(PAIRS))},
}


def _config(scheme: str, **kwargs):
    cfg = make_config(**kwargs)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **TRAINABLE[scheme]))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("scheme", list(TRAINABLE))
def test_scheme_trains_and_resumes_exactly(scheme, dtype, init_ckpt, tmp_path):
    ref_dir, resumed_dir = str(tmp_path / "ref"), str(tmp_path / "resumed")
    ref = train(_config(scheme, load=init_ckpt, save=ref_dir, iters=4, save_interval=2,
                        dtype=dtype), 1)
    assert ref["iteration"] == 4 and len(ref["losses"]) == 4
    recorded = read_meta(iter_dir(ref_dir, 2))["model"]
    assert ModelConfig(**recorded).rope_spec() == _config(scheme).model.rope_spec()

    second = train(_config(scheme, load=str(iter_dir(ref_dir, 2)), save=resumed_dir,
                           iters=4, dtype=dtype), 1)
    assert second["iteration"] == 4
    assert second["losses"] == ref["losses"][2:]  # exact floats
    assert max_weight_diff(final_weights(resumed_dir), final_weights(ref_dir)) == 0.0
