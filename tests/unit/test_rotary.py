"""Every RoPE scheme against HF transformers (the oracle): frequency tables bit for bit, logits of
a converted random LLaMA below and above the original length, KV-cache decoding across it, the
round trip back to HF for both config spellings, and the flags / old-checkpoint mapping.

The tiny models have head dim 16 (8 rotary pairs) and an original length of 32, so "above"
is 80 tokens and decoding crosses the original length after a 20-token prefill.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from megatron_longctx.config.model import ModelConfig, RopeSpec
from tests.unit.test_convert import VOCAB, make_hf, read_hf_tensors

ORIGINAL = 32
BELOW, ABOVE = 24, 80
PAIRS = 8
SHORT = [1.0 + 0.05 * i for i in range(PAIRS)]
LONG = [1.5 + 0.6 * i for i in range(PAIRS)]

#: scheme -> (HF rope parameters without rope_theta, max_position_embeddings[, other config])
SCHEMES: dict[str, tuple] = {
    "default": ({"rope_type": "default"}, 128),
    "linear": ({"rope_type": "linear", "factor": 4.0}, 128),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, ORIGINAL),
    "yarn": ({"rope_type": "yarn", "factor": 4.0,
              "original_max_position_embeddings": ORIGINAL}, 128),
    "yarn-mscale-untruncated": ({"rope_type": "yarn", "factor": 8.0, "beta_fast": 16.0,
                                 "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                                 "truncate": False,
                                 "original_max_position_embeddings": ORIGINAL}, 256),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                "high_freq_factor": 6.0, "original_max_position_embeddings": ORIGINAL}, 256),
    "longrope": ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                  "original_max_position_embeddings": ORIGINAL}, 128),
    # 4 heads x head_dim 32 != hidden 64 (--kv-channels 32): 16 rotary pairs, yarn's scale
    "yarn-head-dim-32": ({"rope_type": "yarn", "factor": 4.0,
                          "original_max_position_embeddings": ORIGINAL}, 128, {"head_dim": 32}),
    # Qwen2.5's shape of extension: Q/K/V biases (--add-qkv-bias) with YaRN
    "qwen2-yarn": ({"rope_type": "yarn", "factor": 4.0,
                    "original_max_position_embeddings": ORIGINAL}, 128, {"family": "qwen2"}),
}
THETA = 10000.0


def _hf_model_dir(directory: Path, scheme: str, style: str):
    """A random HF model with the scheme; `style` legacy rewrites config.json the 4.x way
    (top-level rope_theta + rope_scaling) and returns the model reloaded from it."""
    from transformers import AutoModelForCausalLM

    params, max_pos, *other = SCHEMES[scheme]
    model = make_hf(directory, seed=3, max_position_embeddings=max_pos,
                    rope_parameters={**params, "rope_theta": THETA}, **(other or [{}])[0])
    if style == "legacy":
        path = directory / "config.json"
        cfg = json.loads(path.read_text())
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = None if rope["rope_type"] == "default" else rope
        path.write_text(json.dumps(cfg))
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model


def _hf_cached_decode(hf, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """HF logits of the last position of a `prefill`-token prefill, then of each 1-token step."""
    with torch.no_grad():
        out = hf(ids[:, :prefill], use_cache=True)
        rows, cache = [out.logits[0, -1]], out.past_key_values
        for i in range(prefill, ids.shape[1]):
            out = hf(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
            rows.append(out.logits[0, -1])
            cache = out.past_key_values
    return torch.stack(rows)


def _ours(ckpt: Path, full: list[torch.Tensor], decode: torch.Tensor,
          prefill: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Our logits (TP1) of full forwards and of the same KV-cache decode as HF's."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_longctx.checkpoint.meta import read_meta, resolve_checkpoint
    from megatron_longctx.checkpoint.model_io import load_model_checkpoint, single_process_group
    from megatron_longctx.config.model import ParallelConfig
    from megatron_longctx.model.build import build_model

    cfg = ModelConfig(**read_meta(resolve_checkpoint(ckpt))["model"])
    with single_process_group(), torch.no_grad():
        model = build_model(cfg, ParallelConfig()).eval()
        load_model_checkpoint([model], ckpt)
        logits = [model(ids, torch.arange(ids.shape[1]).expand_as(ids), attention_mask=None)
                  [..., :VOCAB] for ids in full]
        context = StaticInferenceContext(max_batch_size=1, max_sequence_length=decode.shape[1])
        rows = []
        for a, b in [(0, prefill)] + [(i, i + 1) for i in range(prefill, decode.shape[1])]:
            out = model(decode[:, a:b], torch.arange(a, b)[None], None,
                        inference_context=context, runtime_gather_output=True)
            context.increment_sequence_len_offset(b - a)
            rows.append(out[0, -1, :VOCAB])
    return logits, torch.stack(rows)


def _config_dict(directory: Path) -> dict:
    from transformers import AutoConfig

    drop = {"transformers_version", "_name_or_path"}
    return {k: v for k, v in AutoConfig.from_pretrained(directory).to_dict().items()
            if k not in drop}


@pytest.mark.parametrize("style", ["v5", "legacy"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_scheme_matches_hf_and_round_trips(tmp_path: Path, scheme: str, style: str) -> None:
    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron, convert_megatron_to_hf

    hf = _hf_model_dir(tmp_path / "hf", scheme, style)
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg")
    gen = torch.Generator().manual_seed(11)
    full = [torch.randint(0, VOCAB, (1, n), generator=gen) for n in (BELOW, ABOVE)]
    decode = torch.randint(0, VOCAB, (1, 48), generator=gen)
    # HF's dynamic NTK keeps the largest length seen until a sequence shorter than the
    # original resets it; lengths ascend, then the decode restarts below the original.
    with torch.no_grad():
        expected = [hf(ids).logits for ids in full]
    expected_decode = _hf_cached_decode(hf, decode, prefill=20)
    logits, decoded = _ours(tmp_path / "meg", full, decode, prefill=20)
    diffs = [float((a - b).abs().max()) for a, b in zip(logits, expected)]
    diffs.append(float((decoded - expected_decode).abs().max()))
    print(f"{scheme} {style}: max |logit diff| below/above/decode {diffs}")
    assert max(diffs) < 1e-5, diffs

    convert_megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    original, back = read_hf_tensors(tmp_path / "hf"), read_hf_tensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[k], back[k]) for k in original)
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert ("rope_parameters" in written) == (style == "v5")
    assert _config_dict(tmp_path / "hf") == _config_dict(tmp_path / "back")


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s != "default" and
                                    len(SCHEMES[s]) == 2])
def test_fresh_export_is_read_back_by_transformers(scheme: str) -> None:
    """Without the original HF config (a model trained from flags), the exported config.json
    holds both spellings and transformers computes the same frequencies from it."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_longctx.convert.hf_llama import hf_config_from_model, model_config_from_hf
    from megatron_longctx.model.rotary import inverse_frequencies

    params, max_pos = SCHEMES[scheme]
    source = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                         intermediate_size=64, max_position_embeddings=max_pos,
                         rope_parameters={**params, "rope_theta": THETA}).to_dict()
    cfg = model_config_from_hf(source)
    exported = LlamaConfig.from_dict(hf_config_from_model(cfg, "fp32"))
    assert model_config_from_hf(exported.to_dict()).rope_spec() == cfg.rope_spec()
    for length in (None, BELOW, ABOVE):
        want, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](exported, "cpu", seq_len=length)
        assert torch.equal(inverse_frequencies(cfg.rope_spec(), 16, length), want)
        assert cfg.rope_spec().attention_scaling() == scale


def _spec(**changes) -> ModelConfig:
    return dataclasses.replace(
        ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                    max_position_embeddings=1024, seq_length=512), **changes)


def test_megatron_aliases_and_old_checkpoint_fields() -> None:
    # A checkpoint saved before rope_type existed: only Megatron's fields, factor stored as 8.
    old = {f.name: getattr(_spec(), f.name) for f in dataclasses.fields(ModelConfig)
           if not f.name.startswith(("rope_type", "rope_original", "rope_low", "rope_high",
                                     "yarn_", "rope_attention", "longrope_"))}
    llama31 = ModelConfig(**{**old, "rope_scaling": True, "rope_scaling_factor": 8.0,
                             "rotary_base": 500000})
    assert llama31.rope_spec() == RopeSpec(
        rope_type="llama3", theta=500000.0, factor=8.0, original_max_position_embeddings=8192,
        max_position_embeddings=1024)
    linear = ModelConfig(**{**old, "seq_len_interpolation_factor": 4.0})
    assert (linear.rope_spec().rope_type, linear.rope_spec().factor) == ("linear", 4.0)
    plain = ModelConfig(**{**old, "rope_scaling_factor": 8.0})
    assert plain.rope_spec().rope_type == "default"
    same = _spec(rope_type="linear", rope_scaling_factor=4.0).rope_spec()
    assert linear.rope_spec() == same
    longrope = ModelConfig(**json.loads(json.dumps(dataclasses.asdict(_spec(
        rope_type="longrope", rope_original_max_position_embeddings=256,
        longrope_short_factor=SHORT, longrope_long_factor=LONG)))))
    assert longrope.longrope_short_factor == tuple(SHORT)  # JSON lists back to tuples
    longrope.validate()


@pytest.mark.parametrize("changes,message", [
    ({"rope_type": "yarn", "rope_scaling_factor": 4.0},
     "--rope-type yarn needs --rope-original-max-position-embeddings"),
    ({"rope_type": "dynamic", "rope_original_max_position_embeddings": 64},
     "--rope-type dynamic needs --rope-scaling-factor"),
    ({"rope_type": "linear", "rope_scaling_factor": 0.5}, "--rope-scaling-factor must be >= 1"),
    ({"rope_type": "llama3", "rope_low_freq_factor": 4.0},
     "--rope-low-freq-factor (4.0) must be positive and below --rope-high-freq-factor"),
    ({"yarn_beta_fast": 16.0}, "--yarn-beta-fast applies to --rope-type yarn, not default"),
    ({"rope_type": "llama3", "rope_attention_factor": 1.2},
     "--rope-attention-factor applies to --rope-type yarn / longrope, not llama3"),
    ({"yarn_truncate": False, "rope_type": "linear", "rope_scaling_factor": 2.0},
     "--no-yarn-truncate applies to --rope-type yarn"),
    ({"rope_scaling": True, "rope_type": "yarn"}, "--use-rope-scaling means --rope-type llama3"),
    ({"seq_len_interpolation_factor": 2.0, "rope_type": "dynamic"},
     "--rotary-seq-len-interpolation-factor means --rope-type linear"),
    ({"rope_type": "longrope", "rope_original_max_position_embeddings": 256,
      "longrope_short_factor": (1.0,) * 8, "longrope_long_factor": (1.0,) * 3},
     "--longrope-long-factor with rotary dim / 2 = 8 values, got 3"),
    ({"rope_type": "yarn", "rope_scaling_factor": 4.0, "yarn_beta_fast": 1.0,
      "rope_original_max_position_embeddings": 256}, "--yarn-beta-slow (1.0) must be below"),
])
def test_validation_names_the_flag(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _spec(**changes).validate()


def test_trainer_flags_build_each_scheme() -> None:
    from megatron_longctx.config.training import parse_pretrain_args

    base = ["--model-preset", "tiny", "--seq-length", "128", "--mock-data",
            "--vocab-size", "512", "--tokenizer-type", "NullTokenizer",
            "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1",
            "--lr", "1e-3", "--position-embedding-type", "rope"]
    cases = {
        ("--use-rope-scaling", "--rope-scaling-factor", "4"): ("llama3", 4.0),
        ("--rotary-seq-len-interpolation-factor", "2"): ("linear", 2.0),
        ("--rope-type", "yarn", "--rope-factor", "4", "--rope-original-max-position-embeddings",
         "32", "--yarn-beta-fast", "16", "--no-yarn-truncate"): ("yarn", 4.0),
        ("--rope-type", "longrope", "--rope-original-max-position-embeddings", "32",
         "--longrope-short-factor", *map(str, SHORT), "--longrope-long-factor",
         *map(str, LONG)): ("longrope", None),
    }
    for extra, (kind, factor) in cases.items():
        spec = parse_pretrain_args([*base, *extra]).model.rope_spec()
        assert (spec.rope_type, spec.factor) == (kind, factor), extra
    yarn = parse_pretrain_args([*base, *list(cases)[2]]).model.rope_spec()
    assert (yarn.beta_fast, yarn.truncate) == (16.0, False)


def test_rope_periods_tool(tmp_path: Path, capsys) -> None:
    import importlib.util

    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("rope_periods",
                                                  repo / "tools" / "rope_periods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # LLaMA-2 7B at 4K: 18 of 64 pairs have wavelengths beyond 4096 (docs/demo.md).
    assert module.main(["--head-dim", "128", "--rotary-base", "10000", "--target-length",
                        "4096"]) == 0
    assert "46 of 64 rotary pairs complete a period within 4096" in capsys.readouterr().out
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "rope_theta": 500000.0, "model_type": "llama"}))
    assert module.main(["--hf-config", str(tmp_path / "config.json"), "--target-length",
                        "131072", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rope_type"] == "llama3" and report["pairs"] == 64
    assert 0 < report["complete_periods"] <= 64


@pytest.mark.parametrize("scheme", ["dynamic", "longrope", "yarn-head-dim-32", "qwen2-yarn"])
def test_eval_backend_cached_generation_matches_hf(tmp_path: Path, scheme: str) -> None:
    """The evaluation backend (MegatronCausalLM: chunked prefill + static KV cache, prefix
    reuse) generates HF's cached greedy tokens across the original length, for the schemes
    whose frequencies change with the length (the per-position history of model/rotary.py)."""
    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron
    from megatron_longctx.eval.models import MegatronCausalLM

    hf = _hf_model_dir(tmp_path / "hf", scheme, "v5")
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg")
    prompt = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = hf(prompt, use_cache=True)
        expected = []
        for _ in range(30):
            token = int(out.logits[0, -1].argmax())
            expected.append(token)
            out = hf(torch.tensor([[token]]), past_key_values=out.past_key_values,
                     use_cache=True)
    with MegatronCausalLM(tmp_path / "meg", prefill_chunk=8) as model:
        assert model.generate(prompt[0].tolist(), 30, stop_ids=[]) == expected
        # prefix reuse keeps the first 12 prompt positions (fed at their own lengths)
        assert model.generate(prompt[0].tolist(), 30, stop_ids=[], reuse_prefix=True) == \
            expected
        assert model.generate(prompt[0].tolist(), 30, stop_ids=[], reuse_prefix=True) == \
            expected
