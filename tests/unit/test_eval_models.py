"""Prefix-reusing generation of the evaluation backends (`generate(..., reuse_prefix=True)`,
`reserve_cache`, `clear_cache`): on ours and HF, with chunked and whole-prompt prefill, every
response equals plain KV-cache generation, and the reused token counts are the common prefixes
with what the cache holds (extension, rewind, identical prompt, continuation after generated
tokens, stop tokens, reallocation, clearing). tests/distributed/test_eval_ruler_tp.py runs
`reuse_sequence` at TP2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.unit.test_eval_needle import make_tiny_hf

NEW = 8
_RNG = np.random.default_rng(11)
BASE = [int(x) for x in _RNG.integers(3, 700, size=1300)]
TAIL = [int(x) for x in _RNG.integers(3, 700, size=60)]


def reuse_sequence(model) -> list[tuple[str, list[int], int, list[int], int]]:
    """Prompts chosen to exercise the persistent cache, each generated with reuse and plainly
    (plain calls between reuse calls must leave the cache alone). Returns per step: name,
    tokens with reuse, reused tokens, plain tokens, the reuse expected by hand (-1: backend
    dependent)."""
    steps: list[tuple[str, list[int], int, list[int], int]] = []
    last: dict[str, list[int]] = {}

    def run(name: str, prompt: list[int], expected: int, stop: list[int] | None = None) -> None:
        stop = [] if stop is None else stop
        plain = model.generate(prompt, NEW, stop_ids=stop)
        tokens = model.generate(prompt, NEW, stop_ids=stop, reuse_prefix=True)
        steps.append((name, tokens, model.last_reused_tokens, plain, expected))
        last[name] = tokens

    a = BASE[:200]
    run("first", a, 0)
    run("extend", a + TAIL[:40], 200)
    run("same again", a + TAIL[:40], 239)  # all but the last prompt token
    run("shorter", a, 199)
    # continuation: the cache holds a and the 7 fed tokens of its answer (the 8th was not fed)
    run("continue", a + last["shorter"], 207)
    run("rewind", BASE[:100] + TAIL[:30], 100)
    # stop at the first new token not seen before (k >= 2): the k tokens before it were fed
    probe = model.generate(BASE[:150], NEW, stop_ids=[])
    k = next(i for i in range(2, NEW) if probe[i] not in probe[:i])
    run("stop", BASE[:150], 100, stop=[probe[k]])
    run("after stop", BASE[:150] + probe[:k] + TAIL[:5], 150 + k)
    # longer than ours' first allocation (1024 positions): a new cache starts empty
    run("longer", BASE[:1100], -1)
    run("longer again", BASE[:1150], 1100)
    model.clear_cache()
    run("cleared", BASE[:1150], 0)
    model.reserve_cache(4096)  # ours: the 2048-position cache is dropped; HF: nothing to do
    run("reserved", BASE[:1200], -1)
    run("reserved again", BASE[:1300], 1200)
    return steps


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, hf_tokenizer_dir) -> tuple[Path, Path]:
    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("reuse-models")
    hf = make_tiny_hf(root / "hf", hf_tokenizer_dir, seed=9)
    return hf, convert_hf_to_megatron(hf, root / "ours")


@pytest.mark.parametrize("kind", ["hf", "ours"])
def test_prefix_reuse_equals_plain_generation(tiny_models, kind) -> None:
    import torch

    from megatron_longctx.eval.models import load_causal_lm

    torch.set_num_threads(1)
    path = tiny_models[0] if kind == "hf" else tiny_models[1]
    model = load_causal_lm(path, prefill_chunk=64)
    try:
        steps = reuse_sequence(model)
        model.prefill_chunk = 0  # whole-rest prefill after the kept prefix
        model.clear_cache()
        whole = reuse_sequence(model)
        with pytest.raises(ValueError, match="use_cache"):
            model.generate(BASE[:10], 2, use_cache=False, reuse_prefix=True)
        assert model.generate(BASE[:10], 0, reuse_prefix=True) == []
        assert model.last_reused_tokens == 0
    finally:
        model.close()
    model.clear_cache()  # after close: a no-op
    for run in (steps, whole):
        for name, tokens, reused, plain, expected in run:
            assert tokens == plain, (kind, name)
            if expected >= 0:
                assert reused == expected, (kind, name, reused)
        reused = {name: r for name, _, r, _, _ in run}
        assert 2 <= len(dict((n, t) for n, t, *_ in run)["stop"]) < NEW
        if kind == "ours":  # a too-small static cache is reallocated, empty
            assert reused["longer"] == 0 and reused["reserved"] == 0
        else:  # HF's DynamicCache grows
            assert reused["longer"] == 150 and reused["reserved"] == 1150
    assert [s[1] for s in steps] == [s[1] for s in whole]
