"""HF LLaMA <-> megatron checkpoint conversion: logits, bitwise round trips, config mapping,
CLI errors. Models are tiny random `LlamaForCausalLM`s (GQA 4 heads / 2 groups, hidden 64,
vocab 300 so Megatron pads to 384), with every weight randomised (norms too, so a swapped
norm cannot hide behind all-ones weights)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_longctx.convert.hf_llama import (
    ConversionError,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    hf_config_from_model,
    megatron_region,
    model_config_from_hf,
    parse_size,
    plan_shards,
)

REPO = Path(__file__).resolve().parents[2]
VOCAB = 300
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def hf_config(**changes):
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    kwargs.update(changes)
    return LlamaConfig(**kwargs)


def make_hf(directory: Path, seed: int = 0, max_shard_size: str | None = None,
            dtype: torch.dtype = torch.float32, family: str = "llama", **changes):
    """Save a random LlamaForCausalLM (`family` mistral: MistralForCausalLM without a sliding
    window; qwen2: Qwen2ForCausalLM, Q/K/V biases) into `directory`; returns the fp32 model
    (eval mode)."""
    import transformers

    torch.manual_seed(seed)
    config = hf_config(**changes)
    if family != "llama":
        kwargs = config.to_dict()
        for key in ("model_type", "architectures", "attention_bias", "mlp_bias",
                    "pretraining_tp", "transformers_version"):
            kwargs.pop(key, None)
        name = {"mistral": "Mistral", "qwen2": "Qwen2"}[family]
        config = getattr(transformers, f"{name}Config")(**kwargs, sliding_window=None)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if param.dim() == 1 else 0.0))
    model.to(dtype).save_pretrained(directory, **({"max_shard_size": max_shard_size}
                                                  if max_shard_size else {}))
    return model.float()


def read_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def megatron_logits(ckpt: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [b, s, padded vocab] of our GPTModel (TP1, in process) loaded from `ckpt`, and
    its RoPE frequencies per position step (inv_freq / linear interpolation factor)."""
    from megatron_longctx.checkpoint.meta import read_meta, resolve_checkpoint
    from megatron_longctx.checkpoint.model_io import load_model_checkpoint, single_process_group
    from megatron_longctx.config.model import ModelConfig, ParallelConfig
    from megatron_longctx.model.build import build_model

    cfg = ModelConfig(**read_meta(resolve_checkpoint(ckpt))["model"])
    with single_process_group():
        model = build_model(cfg, ParallelConfig()).eval()
        load_model_checkpoint([model], ckpt)
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        with torch.no_grad():
            logits = model(ids, positions, attention_mask=None)
        rope = model.rotary_pos_emb
        return logits, rope.inv_freq / (rope.seq_len_interpolation_factor or 1.0)


CASES = {
    "untied-gqa-sharded": dict(max_shard_size="40KB"),
    "tied": dict(tie_word_embeddings=True),
    "llama3-rope": dict(max_position_embeddings=16384,
                        rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE}),
    "linear-rope": dict(rope_parameters={"rope_type": "linear", "factor": 4.0,
                                         "rope_theta": 10000.0}),
    # heads x head_dim (4 x 32) != hidden (64): --kv-channels 32
    "decoupled-head-dim": dict(head_dim=32),
    # Mistral v0.2+ (no sliding window, rope_theta 1e6), exported back as Mistral
    "mistral": dict(family="mistral", rope_parameters={"rope_type": "default",
                                                       "rope_theta": 1000000.0}),
    # Qwen2.5-style: Q/K/V biases (--add-qkv-bias), tied embeddings, YaRN
    "qwen2": dict(family="qwen2", tie_word_embeddings=True,
                  rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                   "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf_and_round_trip_is_bitwise(tmp_path, case) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = make_hf(tmp_path / "hf", **CASES[case])
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    logits, inv_freq = megatron_logits(tmp_path / "meg", ids)
    assert logits.shape == (2, 24, 384)
    assert torch.allclose(inv_freq, hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    with torch.no_grad():
        expected = hf(ids).logits
    assert (logits[..., :VOCAB] - expected).abs().max() < 1e-4
    assert torch.count_nonzero(logits[..., VOCAB:]) == 0  # padded rows imported as zeros

    convert_megatron_to_hf(tmp_path / "meg", tmp_path / "back", max_shard_size="40KB")
    original, back = read_hf_tensors(tmp_path / "hf"), read_hf_tensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[k], back[k]) for k in original)
    assert len(list((tmp_path / "back").glob("*.safetensors"))) > 1
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    drop = {"transformers_version", "_name_or_path"}
    a = {k: v for k, v in AutoConfig.from_pretrained(tmp_path / "hf").to_dict().items()
         if k not in drop}
    b = {k: v for k, v in AutoConfig.from_pretrained(tmp_path / "back").to_dict().items()
         if k not in drop}
    assert a == b
    raw = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (raw["model_type"], raw["architectures"]) == (
        (case, [f"{case.capitalize()}ForCausalLM"]) if case in ("mistral", "qwen2") else
        ("llama", ["LlamaForCausalLM"]))
    # transformers reads the export back as the same class, with the same logits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(reloaded) is type(hf)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_bf16_round_trip_and_bin_shards(tmp_path) -> None:
    """bf16 stays bf16 bitwise; legacy pytorch_model.bin input (torch.save) converts too."""
    make_hf(tmp_path / "hf", dtype=torch.bfloat16)
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg")
    meta = json.loads((tmp_path / "meg" / "iter_0000000" / "longctx_meta.json").read_text())
    assert meta["params_dtype"] == "bf16" and meta["has_optimizer"] is False
    convert_megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    original, back = read_hf_tensors(tmp_path / "hf"), read_hf_tensors(tmp_path / "back")
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(original[k], back[k])
               for k in original)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"

    # The trainer loads the bf16 checkpoint into fp32 parameters: an exact cast.
    from megatron_longctx.checkpoint.model_io import (
        canonical_parameters,
        load_model_checkpoint,
        single_process_group,
    )
    from megatron_longctx.config.model import ModelConfig, ParallelConfig
    from megatron_longctx.model.build import build_model

    with single_process_group():
        model = build_model(ModelConfig(**meta["model"]), ParallelConfig())
        load_model_checkpoint([model], tmp_path / "meg")
        gate = canonical_parameters(model)["decoder.layers.1.mlp.linear_fc1.weight"][:176]
        assert gate.dtype == torch.float32
        assert torch.equal(gate, original["model.layers.1.mlp.gate_proj.weight"].float())

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(original, legacy / "pytorch_model.bin")
    with pytest.warns(UserWarning, match=r"stored as \['torch.bfloat16'\] were cast"):
        convert_hf_to_megatron(legacy, tmp_path / "meg_bin", params_dtype="fp32")
    convert_megatron_to_hf(tmp_path / "meg_bin", tmp_path / "back_bin", dtype="bf16")
    back_bin = read_hf_tensors(tmp_path / "back_bin")
    assert all(torch.equal(original[k], back_bin[k]) for k in original)


def test_qkv_layout_is_grouped_q_k_v() -> None:
    """Rows of linear_qkv: for each of the 2 groups, its 2 q heads, then k, then v."""
    cfg = model_config_from_hf(hf_config().to_dict())
    qkv = torch.arange(8 * 16, dtype=torch.float32).repeat_interleave(64).view(128, 64)
    def head(t: torch.Tensor) -> torch.Tensor:  # head index of each 16-row block
        return t[::16, 0] // 16

    q = megatron_region(qkv, "q", cfg).reshape(64, 64)
    k = megatron_region(qkv, "k", cfg).reshape(32, 64)
    v = megatron_region(qkv, "v", cfg).reshape(32, 64)
    assert head(q).tolist() == [0, 1, 4, 5]
    assert head(k).tolist() == [2, 6] and head(v).tolist() == [3, 7]


def test_config_mapping_both_spellings_and_rope_types() -> None:
    legacy = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
              "num_hidden_layers": 2, "intermediate_size": 176, "vocab_size": VOCAB,
              "max_position_embeddings": 131072, "rope_theta": 500000.0,
              "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0}, "torch_dtype": "bfloat16",
              "tie_word_embeddings": True}
    cfg = model_config_from_hf(legacy)
    assert (cfg.rotary_base, cfg.rope_type, cfg.rope_scaling_factor) == (500000, "llama3", 32.0)
    assert (cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
            cfg.rope_original_max_position_embeddings) == (1.0, 4.0, 8192)
    assert cfg.num_query_groups == 4 and not cfg.untie_embeddings_and_output_weights
    assert cfg.pad_vocab and cfg.seq_length == 131072
    out = hf_config_from_model(cfg, "bf16", base=legacy)
    assert out["rope_scaling"]["factor"] == 32.0 and "rope_parameters" not in out
    assert out["torch_dtype"] == "bfloat16" and "dtype" not in out
    linear = model_config_from_hf({**legacy, "rope_scaling": {"type": "linear", "factor": 4}})
    assert linear.rope_spec().rope_type == "linear" and linear.rope_spec().factor == 4.0

    from transformers import LlamaConfig

    fresh = hf_config_from_model(cfg, "fp32")  # no base: both spellings, read by transformers
    assert fresh["rope_theta"] == fresh["rope_parameters"]["rope_theta"] == 500000.0
    parsed = LlamaConfig.from_dict(fresh).to_dict()["rope_parameters"]
    assert parsed["rope_type"] == "llama3" and parsed["factor"] == 32.0


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gemma"}, "model_type 'gemma' is not supported"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window 4096"),
    ({"model_type": "mistral", "architectures": ["LlamaForCausalLM"]},
     "not supported for model_type 'mistral'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "not supported"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"head_dim": 0}, "head_dim must be a positive integer"),
    ({"rope_scaling": {"rope_type": "proportional", "factor": 2.0}},
     "rope type 'proportional' not supported"),
    ({"rope_scaling": {"rope_type": "dynamic"}}, "rope type 'dynamic' without a factor"),
    ({"rope_scaling": {**LLAMA3_ROPE, "high_freq_factor": 0.5}}, "--rope-low-freq-factor"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8,
                       "long_factor": [1.0] * 3}}, "--longrope-long-factor with rotary dim"),
    ({"num_key_value_heads": 3}, "--num-query-groups"),
])
def test_config_errors(change, message) -> None:
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 176, "vocab_size": VOCAB,
            "max_position_embeddings": 16384}
    with pytest.raises(ConversionError, match=message.replace("[", r"\[")):
        model_config_from_hf({**base, **change}, where="x/config.json")


def test_shard_sizes() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError, match="max-shard-size"):
        parse_size("5 parsecs")
    cfg = model_config_from_hf(hf_config().to_dict())
    shards = plan_shards(cfg, torch.float32, 40_000)
    assert len(shards) > 1 and shards[0] == ["model.embed_tokens.weight"]  # 76.8 KB alone
    assert plan_shards(cfg, torch.float32, 10**9) == [sum(shards, [])]


def _cli():
    spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                                  REPO / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_round_trip_with_tokenizer_and_tp_flag(tmp_path, capsys) -> None:
    main = _cli()
    make_hf(tmp_path / "hf", tie_word_embeddings=True)
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    assert main(["hf-to-megatron", "--hf-dir", str(tmp_path / "hf"), "--save",
                 str(tmp_path / "meg"), "--tensor-model-parallel-size", "2",
                 "--pipeline-model-parallel-size", "2", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "meg" / "iter_0000000" / "longctx_meta.json").read_text())
    assert meta["converted_for"] == {"tensor_model_parallel_size": 2,
                                     "pipeline_model_parallel_size": 2}
    assert meta["tokenizer"]["model"] == str((tmp_path / "meg" / "tokenizer").resolve())
    assert (tmp_path / "meg" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert not list(tmp_path.glob(".meg.tmp-*"))
    # TP2 padding: 512 rows; the TP1 export below loads rows 0..383 of them.
    from megatron_longctx.checkpoint.model_io import checkpoint_tensor_info

    shape, _ = checkpoint_tensor_info(tmp_path / "meg" / "iter_0000000")[
        "embedding.word_embeddings.weight"]
    assert shape == (512, 64)
    assert main(["megatron-to-hf", "--load", str(tmp_path / "meg" / "iter_0000000"), "--save",
                 str(tmp_path / "back"), "--no-progress"]) == 0
    assert (tmp_path / "back" / "tokenizer.json").read_text() == "{}"
    assert "lm_head.weight" not in read_hf_tensors(tmp_path / "back")
    original, back = read_hf_tensors(tmp_path / "hf"), read_hf_tensors(tmp_path / "back")
    assert all(torch.equal(original[k], back[k]) for k in original)
    assert "wrote" in capsys.readouterr().out


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_cli_errors(tmp_path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    main = _cli()
    hf = tmp_path / "hf"
    make_hf(hf)

    def fails(args: list[str], message: str) -> None:
        assert main([*args, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err, err

    def h2m(src: Path) -> list[str]:
        return ["hf-to-megatron", "--hf-dir", str(src), "--save", str(tmp_path / "out")]

    fails(h2m(tmp_path / "nope"), "not a directory")
    (tmp_path / "empty").mkdir()
    fails(h2m(tmp_path / "empty"), "no config.json")
    fails(["megatron-to-hf", "--load", str(hf), "--save", str(tmp_path / "out")],
          "no megatron-longctx checkpoint")
    fails([*h2m(hf), "--tensor-model-parallel-size", "4"],
          "--num-query-groups (2) must be divisible by --tensor-model-parallel-size (4)")
    fails([*h2m(hf), "--pipeline-model-parallel-size", "3"], "--num-layers (2)")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    fails(["hf-to-megatron", "--hf-dir", str(hf), "--save", str(tmp_path / "full")],
          "is not an empty directory")

    _edit_config(hf, model_type="gemma")
    fails(h2m(hf), "model_type 'gemma' is not supported")
    _edit_config(hf, model_type="llama", attention_bias=True)
    fails(h2m(hf), "attention_bias=true")
    _edit_config(hf, attention_bias=False)

    weights = load_file(hf / "model.safetensors")
    bias = {**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    save_file(bias, hf / "model.safetensors")
    fails(h2m(hf), "model.safetensors: unexpected tensor 'model.layers.0.self_attn.q_proj.bias' "
                   "(biases are not supported)")
    missing = {k: v for k, v in weights.items() if k != "model.norm.weight"}
    save_file(missing, hf / "model.safetensors")
    fails(h2m(hf), "1 tensors missing, e.g. ['model.norm.weight']")
    wrong = {**weights, "model.norm.weight": torch.ones(65)}
    save_file(wrong, hf / "model.safetensors")
    fails(h2m(hf), "'model.norm.weight' has shape (65,), config.json implies (64,)")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_cli_exit_code_in_subprocess(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"),
                           "hf-to-megatron", "--hf-dir", str(tmp_path / "missing"), "--save",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 2
    assert "not a directory" in proc.stderr and "Traceback" not in proc.stderr


def test_model_only_load_and_errors(tmp_path) -> None:
    """A checkpoint with more than the model (as the trainer's, with optimizer state) loads
    model-only; a different architecture or a non-checkpoint fails with a clear message."""
    from dataclasses import replace

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_longctx.checkpoint.meta import read_meta, resolve_checkpoint, write_meta
    from megatron_longctx.checkpoint.model_io import (
        canonical_parameters,
        load_model_checkpoint,
        model_sharded_state_dict,
        single_process_group,
    )
    from megatron_longctx.config.model import ModelConfig, ParallelConfig
    from megatron_longctx.model.build import build_model

    make_hf(tmp_path / "hf")
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg")
    meta = read_meta(resolve_checkpoint(tmp_path / "meg"))
    cfg = ModelConfig(**meta["model"])
    trained = tmp_path / "trained" / "iter_0000010"
    trained.mkdir(parents=True)
    with single_process_group():
        source = build_model(cfg, ParallelConfig())
        load_model_checkpoint([source], tmp_path / "meg")
        state = model_sharded_state_dict([source])
        state["optimizer"] = {"exp_avg": ShardedTensor.from_rank_offsets(
            "optimizer.exp_avg", torch.ones(5))}
        dist_checkpointing.save(state, str(trained))
        write_meta(trained, {**meta, "iteration": 10, "has_optimizer": True})

        model = build_model(cfg, ParallelConfig())
        assert load_model_checkpoint([model], trained)["has_optimizer"] is True
        want, got = canonical_parameters(source), canonical_parameters(model)
        assert all(torch.equal(want[k], got[k]) for k in want)

        other = build_model(replace(cfg, ffn_hidden_size=128), ParallelConfig())
        with pytest.raises(ValueError, match="ffn_hidden_size: checkpoint 176, model 128"):
            load_model_checkpoint([other], tmp_path / "meg")
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            load_model_checkpoint([model], tmp_path / "hf")


def test_mistral_evaluates_alike_on_both_backends(tmp_path) -> None:
    """A Mistral directory (no sliding window) passes the evaluation's strict HF load, and our
    backend on its conversion generates the same greedy tokens as the HF backend."""
    from megatron_longctx.eval.models import HFCausalLM, MegatronCausalLM

    make_hf(tmp_path / "hf", family="mistral")
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg")
    prompt = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    with HFCausalLM(tmp_path / "hf") as hf, MegatronCausalLM(tmp_path / "meg") as ours:
        assert ours.generate(prompt, 12, stop_ids=[]) == hf.generate(prompt, 12, stop_ids=[])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    with pytest.raises(ConversionError, match="sliding_window 16"):
        HFCausalLM(tmp_path / "hf")
