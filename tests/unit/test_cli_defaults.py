"""One source for defaults and help: every config field a tool uses is reachable from
its CLI, the CLI's defaults are the dataclass defaults, and the vocabulary flags do what they
say (--make-vocab-size-divisible-by honoured; a checkpoint of another vocabulary is exit 2)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longctx.config.cli import build_mixture_parser, build_preprocess_parser
from megatron_longctx.config.flags import (
    FLAG_KEY,
    Flag,
    cli_default,
    config_from_namespace,
    field_default,
    iter_fields,
    option,
)
from megatron_longctx.config.mixture import MixtureConfig
from megatron_longctx.config.preprocess import PreprocessConfig
from megatron_longctx.config.presets import get_preset
from megatron_longctx.config.training import (
    MEGATRON_COMPAT_FLAGS,
    PretrainConfig,
    build_pretrain_parser,
    config_from_args,
    resolve_runtime,
)

ROOT = Path(__file__).resolve().parents[2]
TOOLS = {
    "pretrain_longctx.py": (build_pretrain_parser, PretrainConfig),
    "preprocess_data.py": (build_preprocess_parser, PreprocessConfig),
    "blend_mixture.py": (build_mixture_parser, MixtureConfig),
}
#: Every flag pretrain_longctx.py had before the flags were generated (the GPU switches included).
PRETRAIN_FLAGS_BEFORE = " ".join("""
--model-preset --num-layers --hidden-size --ffn-hidden-size --num-attention-heads
--num-query-groups --max-position-embeddings --seq-length --rotary-base --padded-vocab-size
--group-query-attention --normalization --norm-epsilon --swiglu --disable-bias-linear
--untie-embeddings-and-output-weights --position-embedding-type --rotary-percent
--use-rope-scaling --rope-scaling-factor --rotary-seq-len-interpolation-factor --init-method-std
--make-vocab-size-divisible-by --mixture-plan --data-path --data-args-path
--per-split-data-args-path --mock-data --split --tokenizer-type --tokenizer-model --vocab-size
--reset-attention-mask --eod-mask-loss --data-cache-path --micro-batch-size --global-batch-size
--train-iters --lr --min-lr --lr-warmup-iters --lr-decay-style --lr-decay-iters --weight-decay
--clip-grad --adam-beta1 --adam-beta2 --adam-eps --seed --eval-interval --eval-iters
--recompute-granularity --recompute-method --recompute-num-layers --on-nan-loss
--exit-duration-in-mins --exit-signal-handler --exit-interval --tensor-model-parallel-size
--sequence-parallel --pipeline-model-parallel-size --num-layers-per-virtual-pipeline-stage
--context-parallel-size --cp-comm-type --hierarchical-context-parallel-sizes
--use-distributed-optimizer --overlap-grad-reduce --no-overlap-grad-reduce --bf16 --fp16
--transformer-impl --fp8-format --fp8-recipe --fp8-amax-history-len --fp8-amax-compute-algo
--fp8-dot-product-attention --attention-backend --no-rope-fusion
--no-gradient-accumulation-fusion --save --load --save-interval --no-load-optim --no-load-rng
--finetune --log-interval --tensorboard-dir --peak-tflops
""".splitlines()).split()
MOCK = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512"]


def _options(parser) -> dict[str, object]:
    return {o: a for a in parser._actions for o in a.option_strings}


def _get(cfg: object, path: str) -> object:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_field_is_reachable_from_the_cli(tool):
    build, cls = TOOLS[tool]
    options = _options(build())
    for path, f in iter_fields(cls):
        spec = f.metadata.get(FLAG_KEY)
        assert spec is not None, f"{tool}: {path} has no flag and is not declared derived()"
        names = ([spec.name] + ([spec.negative] if spec.negative else [])
                 if isinstance(spec, Flag) else list(spec.flags))
        for name in names:
            assert name in options, f"{tool}: {path} names {name}, which the parser lacks"
        if isinstance(spec, Flag):
            assert options[spec.name].dest == path


def test_pretrain_keeps_every_flag_and_only_declares_the_megatron_switches():
    options = _options(build_pretrain_parser())
    assert set(PRETRAIN_FLAGS_BEFORE) <= set(options)
    from_fields = set()
    for _, f in iter_fields(PretrainConfig):
        spec = f.metadata.get(FLAG_KEY)
        if isinstance(spec, Flag):
            from_fields |= {spec.name, *spec.aliases, *([spec.negative] if spec.negative else [])}
    compat = {flag for _, flag, _ in MEGATRON_COMPAT_FLAGS}
    assert set(options) - {"-h", "--help"} == from_fields | compat
    assert not from_fields & compat


def test_pretrain_defaults_are_the_dataclass_defaults():
    cfg = config_from_args(build_pretrain_parser().parse_args(
        ["--model-preset", "tiny", "--train-iters", "1", *MOCK]))
    given = {"data.mock_data", "data.tokenizer_type", "data.vocab_size", "model_preset"}
    for path, f in iter_fields(PretrainConfig):
        if path.startswith("model.") or path in given:
            continue
        assert _get(cfg, path) == cli_default(f), path
    assert cfg.model == get_preset("tiny")  # the model's defaults are the preset's
    # The declared exception: the CLI leaves the implementation to the machine.
    assert cfg.precision.transformer_impl is None
    assert field_default(dataclasses.fields(type(cfg.precision))[1]) == "local"


def test_model_defaults_without_a_preset_are_the_dataclass_defaults():
    cfg = config_from_args(build_pretrain_parser().parse_args(
        ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--train-iters", "1", *MOCK]))
    derived = {"num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
               "untie_embeddings_and_output_weights"}
    for f in dataclasses.fields(type(cfg.model)):
        if f.name not in derived:
            assert getattr(cfg.model, f.name) == field_default(f), f.name
    assert cfg.model.ffn_hidden_size == 256 and not cfg.model.untie_embeddings_and_output_weights


@pytest.mark.parametrize("tool,argv", [
    ("preprocess_data.py", ["--input", "x", "--output-prefix", "o", "--tokenizer-type",
                            "HuggingFaceTokenizer", "--tokenizer-model", "t"]),
    ("blend_mixture.py", ["--data-prefix", "p", "--output-dir", "o"]),
])
def test_stage_tool_defaults_are_the_dataclass_defaults(tool, argv):
    build, cls = TOOLS[tool]
    args = build().parse_args(argv)
    vars(args).pop("audit", None)
    cfg = config_from_namespace(cls, args)
    required = {"inputs", "output_prefix", "tokenizer.tokenizer_type",
                "tokenizer.tokenizer_model", "data_prefixes", "output_dir"}
    for path, f in iter_fields(cls):
        if path not in required:
            assert _get(cfg, path) == cli_default(f), (tool, path)


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_help_states_each_default_once_from_the_field(tool):
    build, cls = TOOLS[tool]
    options = _options(build())
    for path, f in iter_fields(cls):
        spec = f.metadata.get(FLAG_KEY)
        if not isinstance(spec, Flag) or spec.required or callable(spec.cli_default) \
                or path.startswith("model."):
            continue
        default = cli_default(f)
        if default in (None, False, {}, []):
            continue
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        assert f"(default: {shown})" in options[spec.name].help, (tool, path)


def test_config_imports_nothing_from_data_or_model():
    code = ("import sys; import megatron_longctx.config.training, megatron_longctx.config.cli;"
            "bad = [m for m in sys.modules if m.startswith(('megatron_longctx.data', "
            "'megatron_longctx.model', 'megatron_longctx.mixture', 'torch', 'megatron.core'))];"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- defect: --make-vocab-size-divisible-by was parsed and never used -------------------------
def _resolved(*argv: str, vocab: int):
    cfg = config_from_args(build_pretrain_parser().parse_args(
        ["--model-preset", "tiny", "--train-iters", "1", *MOCK, *argv]))
    before = dataclasses.replace(cfg.model)
    resolved = resolve_runtime(cfg, te_available=False, tokenizer_vocab=vocab)
    assert cfg.model == before and resolved is not cfg  # a new config; cfg is not mutated
    return resolved


def test_make_vocab_size_divisible_by_sets_the_padding():
    assert _resolved(vocab=300).model.padded_vocab(1) == 384  # Megatron's 128
    assert _resolved("--make-vocab-size-divisible-by", "64", vocab=300).model.padded_vocab(1) \
        == 320
    two = _resolved("--make-vocab-size-divisible-by", "64", "--tensor-model-parallel-size",
                    "2", vocab=300)
    assert two.model.padded_vocab(2) == 384  # multiple of 64 x TP2
    explicit = _resolved("--padded-vocab-size", "1000", vocab=300)
    assert explicit.model.padded_vocab(1) == 1000 and explicit.model.padded_vocab(2) == 1000
    assert explicit.model.vocab_size == 300  # the tokenizer's: rows 300-999 are padding
    with pytest.raises(ValueError, match="--padded-vocab-size"):
        _resolved("--padded-vocab-size", "200", vocab=300)
    with pytest.raises(ValueError, match="--make-vocab-size-divisible-by"):
        _resolved("--make-vocab-size-divisible-by", "0", vocab=300).validate(1)


@pytest.fixture(scope="module")
def checkpoint_320(tmp_path_factory) -> Path:
    """A model-only checkpoint of the tiny preset with vocabulary 300 padded by 64 (320 rows),
    built through model/build.py as the trainer builds its model."""
    from megatron_longctx.checkpoint.model_io import save_model_checkpoint, single_process_group
    from megatron_longctx.config.model import ParallelConfig
    from megatron_longctx.model.build import build_model_chunks

    root = tmp_path_factory.mktemp("vocab") / "ckpt"
    model = dataclasses.replace(get_preset("tiny"), vocab_size=300, pad_vocab=True,
                                make_vocab_size_divisible_by=64)
    with single_process_group():
        chunks = build_model_chunks(model, ParallelConfig())
        save_model_checkpoint(chunks, root, 0, model, ParallelConfig(), source="tests")
    return root


def test_built_model_honours_make_vocab_size_divisible_by(checkpoint_320):
    from megatron_longctx.checkpoint.model_io import checkpoint_tensor_info

    info = checkpoint_tensor_info(checkpoint_320 / "iter_0000000")
    assert info["embedding.word_embeddings.weight"][0][0] == 320


# --- defect: a checkpoint of another vocabulary ended in a traceback --------------------------
def test_checkpoint_vocabulary_mismatch_exits_2_in_one_line(checkpoint_320, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_longctx.py"), "--model-preset", "tiny",
         "--train-iters", "1", "--mock-data", "--tokenizer-type", "NullTokenizer",
         "--vocab-size", "200", "--load", str(checkpoint_320), "--micro-batch-size", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={"PATH": "/usr/bin:/bin", "RANK": "0", "WORLD_SIZE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert str(checkpoint_320) in line and "300" in line and "200" in line
    assert "--vocab-size" in line


def test_padding_mismatch_refused_only_for_a_full_resume(checkpoint_320):
    from megatron_longctx.checkpoint import meta as checkpoint_meta
    from megatron_longctx.training.checkpointing import (
        CheckpointMismatchError,
        check_vocabulary,
    )

    directory = checkpoint_meta.resolve_checkpoint(checkpoint_320)
    meta = checkpoint_meta.read_meta(directory)
    same = _resolved("--make-vocab-size-divisible-by", "64", vocab=300)
    check_vocabulary(directory, meta, same, weights_only=False)
    repadded = _resolved(vocab=300)  # 384 rows: padding differs, the tokenizer does not
    check_vocabulary(directory, meta, repadded, weights_only=True)
    with pytest.raises(CheckpointMismatchError, match="--make-vocab-size-divisible-by") as err:
        check_vocabulary(directory, meta, repadded, weights_only=False)
    assert "320" in str(err.value) and "384" in str(err.value)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError("--names: give at least one name")
    return names


@dataclasses.dataclass(frozen=True)
class _Toy:
    where: str = option(flag=Flag("--where", "required path", required=True))
    names: tuple[str, ...] = option(("a",), Flag("--names", "comma list", parse=_names,
                                                  one_value=True, default_help="a"))
    ratio: float = option(0.5, Flag("--ratio", "a share in %"))


def test_one_value_flags_default_help_and_parse_messages(capsys):
    """The demo tools' shapes: a comma list parsed whole, a shown default other than the
    value, '%' in help, a required flag, the parse error's own text, tool flags beside."""
    import argparse

    from megatron_longctx.config.flags import add_config_flags, flag_of

    parser = argparse.ArgumentParser(prog="toy")
    parser.add_argument("--output-dir", default="out")
    add_config_flags(parser, _Toy)
    toy = config_from_namespace(_Toy, parser.parse_args(["--where", "w", "--names", "x, y"]))
    assert toy == _Toy(names=("x", "y"), where="w")
    assert config_from_namespace(_Toy, parser.parse_args(["--where", "w"])).names == ("a",)
    helptext = parser.format_help()
    assert "comma list (default: a)" in helptext and "in % (default: 0.5)" in helptext
    assert flag_of(next(f for f in dataclasses.fields(_Toy) if f.name == "ratio")) == "--ratio"
    for argv, message in ((["--names", " , "], "--names: give at least one name"),
                          ([], "the following arguments are required: --where")):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
