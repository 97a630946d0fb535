"""Every model-loading tool over a table of damaged inputs: exit 2, exactly one
stderr line naming the damaged file (or directory) and what is wrong, no traceback, nothing
written.

Rows: the evaluation tools (needle, ppl, RULER) and the converter (both directions) run
in-process through their `main` (the whole CLI path, from argv to exit code, without paying
~6 s of imports per row); the trainer and one evaluation row run as real processes, where a
traceback would show. The damage itself (truncation, in-place edits, a marker naming a missing
iteration, a foreign architecture, a missing tensor) comes from test_faults_checkpoint.py.
The dataset rows of the data tools are the data side's (docs/checks.md).

Then, one section per class of silent wrong result (docs/checks.md): reruns identified by
content, what the trainer compares its inputs on, HF configs read as transformers reads them,
evaluation state between prompts, plans and weights files, haystacks without sentence ends.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_longctx.checkpoint.meta import LATEST_NAME
from tests.unit.test_faults_checkpoint import (
    TINY_RUN,
    copy_tree,
    damage_checkpoint,
    damage_hf,
    tiny_models,  # noqa: F401 (fixture)
    truncate,
    write_dataset,
)
from tests.unit.test_faults_checkpoint import _env as trainer_env

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"corrupt_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argv(tool: str, model: Path, out: Path, data: Path) -> list[str]:
    if tool == "eval_needle":
        return ["--model", str(model), "--output-dir", str(out), "--lengths", "128",
                "--depths", "1", "--needle-type", "passkey", "--max-new-tokens", "2"]
    if tool == "eval_ruler":
        return ["--model", str(model), "--output-dir", str(out), "--lengths", "256",
                "--num-samples", "1", "--tasks", "niah_single_1", "--no-progress"]
    if tool == "eval_ppl":
        return ["--model", str(model), "--output-dir", str(out), "--data-path", str(data),
                "--seq-length", "64"]
    if tool == "h2m":
        return ["hf-to-megatron", "--hf-dir", str(model), "--save", str(out), "--no-progress"]
    if tool == "m2h":
        return ["megatron-to-hf", "--load", str(model), "--save", str(out), "--no-progress"]
    raise ValueError(tool)


# (tool, input kind, damage, text the one line must contain besides the file)
ROWS = [
    ("eval_needle", "hf", "missing-tensor", None),
    ("eval_needle", "hf", "gpt2", None),
    ("eval_needle", "hf", "truncated-safetensors", None),
    ("eval_needle", "ours", "truncated-distcp", "truncated"),
    ("eval_needle", "ours", "truncated-common", "truncated or corrupt"),
    ("eval_needle", "ours", "invalid-meta", "invalid JSON"),
    ("eval_needle", "ours", "marker-missing-iteration", "names iteration 1000"),
    ("eval_ruler", "hf", "unexpected-tensor", None),
    ("eval_ruler", "ours", "truncated-metadata", "truncated or corrupt"),
    ("eval_ppl", "hf", "missing-tensor", None),
    ("eval_ppl", "ours", "meta-unknown-field", "does not describe a model"),
    ("eval_ppl", "ours", "marker-garbage", "expected an iteration number"),
    ("eval_ppl", "data", "truncated-bin", "truncated"),
    ("eval_ppl", "data", "missing-idx", "cannot read the dataset index"),
    ("h2m", "hf", "truncated-safetensors", None),
    ("h2m", "hf", "missing-tensor", None),
    ("m2h", "ours", "truncated-distcp", "truncated"),
    ("m2h", "ours", "invalid-meta", "invalid JSON"),
]


def _prepare(kind: str, damage: str, models: dict[str, Path], tmp_path: Path
             ) -> tuple[Path, Path, str]:
    """(model path, data prefix, the file name the error must contain) for one row."""
    data = write_dataset(tmp_path / "data" / "d_text_document")
    if kind == "hf":
        model = copy_tree(models["hf"], tmp_path / "hf")
        return model, data, damage_hf(model, damage)
    model = copy_tree(models["ours"], tmp_path / "ours")
    if kind == "ours":
        return model, data, damage_checkpoint(model, damage)
    if damage == "truncated-bin":
        truncate(Path(f"{data}.bin"))
        return model, data, f"{data}.bin"
    Path(f"{data}.idx").unlink()
    return model, data, f"{data}.idx"


def _assert_one_line(err: str, *needles: str, process: bool = False) -> None:
    """One error line with every needle, no traceback. A process may print megatron's
    import-time notices before it (`UserWarning: Transformer Engine and Apex are not
    installed ...`); the error must be the last line."""
    lines = [line for line in err.splitlines() if line.strip()]
    if process:
        assert not [line for line in lines[:-1] if ": error: " in line], err
        assert all("warn" in line.lower() or line.startswith("  ") for line in lines[:-1]), err
        lines = lines[-1:]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(("tool", "kind", "damage", "what"), ROWS,
                         ids=[f"{t}-{k}-{d}" for t, k, d, _ in ROWS])
def test_tool_refuses_damaged_input(tiny_models, tmp_path, capsys,  # noqa: F811
                                    tool, kind, damage, what) -> None:
    model, data, name = _prepare(kind, damage, tiny_models, tmp_path)
    out = tmp_path / "out"
    module = _tool("convert_checkpoint" if tool in ("h2m", "m2h") else tool)
    capsys.readouterr()
    assert module.main(_argv(tool, model, out, data)) == 2
    err = capsys.readouterr().err
    _assert_one_line(err, f"{module.TOOL}: error: ", name, *([what] if what else []))
    # nothing half-written: no results, no converted directory, no temporary sibling
    assert not out.exists() or not any(out.iterdir())
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_eval_process_names_a_truncated_shard(tiny_models, tmp_path) -> None:  # noqa: F811
    """A truncated .distcp was a bare EOFError traceback in the needle tool."""
    model = copy_tree(tiny_models["ours"], tmp_path / "ours")
    name = damage_checkpoint(model, "truncated-distcp")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "eval_needle.py"),
         *_argv("eval_needle", model, tmp_path / "out", tmp_path)],
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    _assert_one_line(proc.stderr, "eval_needle.py: error: ", name, "truncated", process=True)


TRAINER_ROWS = ["truncated-distcp", "truncated-common", "truncated-metadata",
                "marker-missing-iteration", "marker-garbage", "invalid-meta", "meta-unknown-field"]


@pytest.mark.parametrize("damage", TRAINER_ROWS)
def test_trainer_refuses_damaged_checkpoint(tiny_models, tmp_path, monkeypatch,  # noqa: F811
                                            capsys, damage) -> None:
    """`--load` of a damaged checkpoint: before, EOFError / zip / JSON tracebacks from inside
    dist_checkpointing (a truncated shard: only on the ranks reading it), after the model and
    datasets were built. Now checked before any process group exists (in-process here: the
    entrypoint returns before initialising torch.distributed)."""
    from megatron_longctx.training import entry

    model = copy_tree(tiny_models["ours"], tmp_path / "ours")
    name = damage_checkpoint(model, damage)
    save = tmp_path / "save"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    capsys.readouterr()
    assert entry.main([*TINY_RUN, "--train-iters", "1", "--load", str(model),
                       "--save", str(save)]) == 2
    _assert_one_line(capsys.readouterr().err, "pretrain_longctx.py: error: ", name)
    assert not save.exists() or not (save / LATEST_NAME).exists()


def test_trainer_process_names_a_truncated_shard(tiny_models, tmp_path) -> None:  # noqa: F811
    """The same as a process: exit 2, the error as the last line, no traceback."""
    model = copy_tree(tiny_models["ours"], tmp_path / "ours")
    name = damage_checkpoint(model, "truncated-distcp")
    proc = subprocess.run(
        [sys.executable, str(REPO / "pretrain_longctx.py"), *TINY_RUN, "--train-iters", "1",
         "--load", str(model), "--save", str(tmp_path / "save")],
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    _assert_one_line(proc.stderr, "pretrain_longctx.py: error: ", name, process=True)
    assert not (tmp_path / "save" / LATEST_NAME).exists()


# --------------------------------------------------------------------------------------------
# results identified by content: a rerun into an existing output directory after its inputs
# changed at the same path refuses in one line (it reused the finished cells before)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_models(tmp_path_factory) -> dict[str, Path]:
    """`tiny_models` with a vocabulary that holds the test BPE (717 tokens)."""
    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron
    from tests.unit.test_convert import make_hf

    root = tmp_path_factory.mktemp("eval-models")
    make_hf(root / "hf", vocab_size=768)
    convert_hf_to_megatron(root / "hf", root / "ours")
    return {"hf": root / "hf", "ours": root / "ours"}


def _eval_argv(tool: str, model: Path, out: Path, tokenizer: str) -> list[str]:
    """`_argv` with the test BPE and lengths its prompts fit in."""
    argv = _argv(tool, model, out, out)
    argv[argv.index("--lengths") + 1] = "512"
    return argv + ["--tokenizer-model", tokenizer]


def _rerun_refuses(capsys, tool: str, argv: list[str], change, *needles: str) -> None:
    module = _tool(tool)
    assert module.main(argv) == 0
    capsys.readouterr()
    extra = change() or []
    assert module.main(argv + extra) == 2
    _assert_one_line(capsys.readouterr().err, f"{module.TOOL}: error: ", *needles)


def test_needle_rerun_after_reconversion_refuses(eval_models, tmp_path, capsys,
                                                 hf_tokenizer_dir):
    """An HF model re-saved at the same path with other weights (same size, same config)."""
    from tests.unit.test_convert import make_hf

    model = copy_tree(eval_models["hf"], tmp_path / "hf")
    argv = _eval_argv("eval_needle", model, tmp_path / "out", hf_tokenizer_dir)
    _rerun_refuses(capsys, "eval_needle", argv,
                   lambda: make_hf(model, seed=1, vocab_size=768) and None, "weights_sha256")


def test_needle_rerun_with_another_dtype_refuses(eval_models, tmp_path, capsys,
                                                 hf_tokenizer_dir):
    """Another --dtype changes the answers; the cells were reused and relabelled before."""
    model = copy_tree(eval_models["ours"], tmp_path / "ours")
    argv = _eval_argv("eval_needle", model, tmp_path / "out", hf_tokenizer_dir)
    _rerun_refuses(capsys, "eval_needle", argv + ["--dtype", "fp32"],
                   lambda: ["--dtype", "bf16"], "dtype")


def test_needle_rerun_after_haystack_edit_refuses(eval_models, tmp_path, capsys,
                                                  hf_tokenizer_dir):
    hay = tmp_path / "hay.txt"
    hay.write_text("The sky is blue. The grass is green. " * 200)
    argv = _eval_argv("eval_needle", eval_models["hf"], tmp_path / "out", hf_tokenizer_dir)
    argv += ["--haystack", str(hay)]
    _rerun_refuses(capsys, "eval_needle", argv,
                   lambda: hay.write_text("The sea is grey. The sand is white. " * 200) and None,
                   "haystack_sha256")


def test_ruler_rerun_after_checkpoint_reconverted_refuses(eval_models, tmp_path, capsys,
                                                          hf_tokenizer_dir):
    """A checkpoint of ours re-converted at the same path from other HF weights."""
    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron
    from tests.unit.test_convert import make_hf

    model = copy_tree(eval_models["ours"], tmp_path / "ours")

    def reconvert() -> None:
        import shutil

        make_hf(tmp_path / "hf2", seed=3, vocab_size=768)
        shutil.rmtree(model)
        convert_hf_to_megatron(tmp_path / "hf2", model)

    argv = _eval_argv("eval_ruler", model, tmp_path / "out", hf_tokenizer_dir)
    _rerun_refuses(capsys, "eval_ruler", argv, reconvert, "weights_sha256")


def test_ablation_rerun_after_inputs_changed_refuses(eval_models, tmp_path):
    """The ablation's output directory records its inputs by content: a stage-1 checkpoint
    retrained in place and a new dataset matching a --data-prefix glob were reused before."""
    import shutil

    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron
    from megatron_longctx.demo.ablation import (
        AblationPaths,
        AblationSettings,
        claim_output_dir,
        input_identity,
        resolve_prefixes,
    )
    from tests.unit.test_convert import make_hf

    stage1 = copy_tree(eval_models["ours"], tmp_path / "stage1")
    for name in ("a", "b"):
        prefix = write_dataset(tmp_path / "data" / f"{name}_text_document")
        Path(f"{prefix}.stats.json").write_text("{}")
    settings = AblationSettings(data_prefix=(str(tmp_path / "data" / "*"),),
                                stage1_checkpoint=str(stage1),
                                tokenizer_model=str(tmp_path))
    paths = AblationPaths(tmp_path / "out")

    def claim() -> None:
        prefixes = resolve_prefixes(settings.data_prefix)
        claim_output_dir(settings, paths, input_identity(settings, prefixes))

    claim()
    claim()  # same inputs: resumes
    prefix = write_dataset(tmp_path / "data" / "c_text_document")
    Path(f"{prefix}.stats.json").write_text("{}")
    with pytest.raises(ValueError, match=r"other settings \(datasets\)"):
        claim()
    for suffix in (".bin", ".idx", ".stats.json"):
        Path(f"{prefix}{suffix}").unlink()
    claim()
    make_hf(tmp_path / "hf2", seed=5, vocab_size=768)
    shutil.rmtree(stage1)
    convert_hf_to_megatron(tmp_path / "hf2", stage1)
    with pytest.raises(ValueError, match=r"other settings \(stage1_checkpoint_sha256\)"):
        claim()


# --------------------------------------------------------------------------------------------
# what --load, --data-path and --mixture-plan are compared on (training/compat.py): adopted
# with a log line, or refused in one line naming the field, the file and both values
# --------------------------------------------------------------------------------------------
TIED_ARCH = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176",
             "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2"]
BASE_RUN = [a for a in TINY_RUN if a not in ("--model-preset", "tiny")]
MOCK_FLAGS = ("--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512")


def _train(monkeypatch, argv: list[str]) -> int:
    from megatron_longctx.training import entry

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    return entry.main(argv)


def _refused(monkeypatch, capsys, argv: list[str], *needles: str) -> None:
    capsys.readouterr()
    assert _train(monkeypatch, argv) == 2
    _assert_one_line(capsys.readouterr().err, "pretrain_longctx.py: error: ", *needles)


def test_trainer_adopts_the_checkpoints_position_encoding(tmp_path, monkeypatch, capsys):
    """A converted model trained with RoPE base 500000, continued without --rotary-base: the
    run used (and recorded) the preset's 10000 before; now it adopts 500000 with a log line,
    and an explicit --rotary-base still wins (context extension)."""
    import json

    from megatron_longctx.convert.hf_llama import convert_hf_to_megatron
    from tests.unit.test_convert import make_hf

    make_hf(tmp_path / "hf", vocab_size=512, rope_theta=500000.0)
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "ours")
    capsys.readouterr()
    run = [*TINY_RUN, "--train-iters", "1", "--load", str(tmp_path / "ours")]
    assert _train(monkeypatch, [*run, "--save", str(tmp_path / "a")]) == 0
    assert "adopting the checkpoint's --rotary-base 500000" in capsys.readouterr().err
    meta = json.loads(next((tmp_path / "a").glob("iter_*/longctx_meta.json")).read_text())
    assert meta["model"]["rotary_base"] == 500000
    assert _train(monkeypatch, [*run, "--save", str(tmp_path / "b"),
                                "--rotary-base", "2000000"]) == 0
    assert "replaces the checkpoint's 500000" in capsys.readouterr().err
    meta = json.loads(next((tmp_path / "b").glob("iter_*/longctx_meta.json")).read_text())
    assert meta["model"]["rotary_base"] == 2000000


def test_trainer_refuses_untied_checkpoint_into_tied_model(tiny_models, tmp_path,  # noqa: F811
                                                           monkeypatch, capsys):
    """The output layer was dropped silently before."""
    _refused(monkeypatch, capsys, [*BASE_RUN, *TIED_ARCH, "--train-iters", "1",
                                   "--load", str(tiny_models["ours"])],
             "longctx_meta.json", "untie_embeddings_and_output_weights is True",
             "this run builds False")


def test_trainer_refuses_another_layer_count(tiny_models, tmp_path, monkeypatch,  # noqa: F811
                                             capsys):
    """A traceback from inside dist_checkpointing before."""
    _refused(monkeypatch, capsys, [*TINY_RUN, "--num-layers", "4", "--train-iters", "1",
                                   "--load", str(tiny_models["ours"])],
             "longctx_meta.json", "num_layers is 2", "this run builds 4", "--num-layers")


def test_trainer_refuses_another_optimizer_on_resume(tmp_path, monkeypatch, capsys):
    """A ValueError traceback from inside the loop before."""
    run = [*TINY_RUN, "--train-iters", "1", "--save", str(tmp_path / "ck")]
    assert _train(monkeypatch, [*run, "--use-distributed-optimizer"]) == 0
    _refused(monkeypatch, capsys, [*TINY_RUN, "--train-iters", "2",
                                   "--load", str(tmp_path / "ck")],
             "longctx_meta.json", "use_distributed_optimizer is True", "--no-load-optim")


def _swapped_tokenizer(src: str, dst: Path) -> Path:
    """The same vocabulary size, two tokens' ids swapped: another tokenizer."""
    import json
    import shutil

    shutil.copytree(src, dst)
    spec = json.loads((dst / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    return dst


def _dataset_with_stats(prefix: Path, tokenizer: str) -> Path:
    import json

    from megatron_longctx.config.tokenizer import TokenizerSpec
    from megatron_longctx.data.stats import STATS_FORMAT
    from megatron_longctx.data.tokenizers import build_tokenizer

    write_dataset(prefix, length=100)
    tok = build_tokenizer(TokenizerSpec("HuggingFaceTokenizer", tokenizer))
    Path(f"{prefix}.stats.json").write_text(json.dumps(
        {"format": STATS_FORMAT, "documents": 4, "tokens": 400, "histogram": {"bins": []},
         "tokenizer": tok.identity()}))
    return prefix


def test_trainer_refuses_data_of_another_tokenizer_of_the_same_size(
        tmp_path, monkeypatch, capsys, hf_tokenizer_dir):
    other = _swapped_tokenizer(hf_tokenizer_dir, tmp_path / "tok2")
    data = _dataset_with_stats(tmp_path / "d_text_document", str(other))
    run = [a for a in BASE_RUN if a not in MOCK_FLAGS] + ["--model-preset", "tiny"]
    _refused(monkeypatch, capsys, [*run, "--train-iters", "1", "--tokenizer-type",
                                   "HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer_dir,
                                   "--data-path", str(data)],
             "--data-path", "d_text_document.stats.json", "tokenizer.sha256")


def test_trainer_refuses_token_ids_beyond_the_vocabulary(tmp_path, monkeypatch, capsys):
    data = write_dataset(tmp_path / "d_text_document", length=100)  # ids up to 499
    run = [a for a in BASE_RUN if a not in MOCK_FLAGS] + ["--model-preset", "tiny"]
    _refused(monkeypatch, capsys, [*run, "--train-iters", "1", "--tokenizer-type",
                                   "NullTokenizer", "--vocab-size", "256",
                                   "--data-path", str(data)],
             "--data-path", "d_text_document.bin", "holds token id 4", "vocabulary is 256")


def test_trainer_refuses_a_bad_plan_with_tokenizer_model(tmp_path, monkeypatch, capsys,
                                                         hf_tokenizer_dir):
    """The plan was loaded only inside the loop when --tokenizer-model was given: a
    traceback."""
    plan = tmp_path / "mixture_plan.json"
    plan.write_text("{not json")
    run = [a for a in BASE_RUN if a not in MOCK_FLAGS] + ["--model-preset", "tiny"]
    _refused(monkeypatch, capsys, [*run, "--train-iters", "1", "--tokenizer-type",
                                   "HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer_dir,
                                   "--mixture-plan", str(plan)],
             "mixture_plan.json", "not JSON")


# --------------------------------------------------------------------------------------------
# HF configs read as transformers reads them; non-physical RoPE values refused
# --------------------------------------------------------------------------------------------
def _hf_dict(**changes) -> dict:
    from tests.unit.test_convert import hf_config

    out = hf_config().to_dict()
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):
        out.pop(key, None)
    out.update(changes)
    return out


@pytest.mark.parametrize("changes", [
    # both spellings: transformers takes rope_scaling, its theta from the top level
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
     "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "rope_theta": 500000.0},
    # an empty rope_scaling does not hide rope_parameters
    {"rope_scaling": {}, "rope_parameters": {"rope_type": "linear", "factor": 2.0},
     "rope_theta": 250000.0},
    {"rope_parameters": {"rope_type": "linear", "factor": 3.0, "rope_theta": 20000.0}},
], ids=["both-spellings", "empty-rope-scaling", "v5-only"])
def test_rope_precedence_follows_transformers(changes) -> None:
    from transformers import LlamaConfig

    from megatron_longctx.convert.hf_llama import model_config_from_hf

    hf = _hf_dict(**changes)
    want = LlamaConfig(**json.loads(json.dumps(hf))).rope_parameters
    got = model_config_from_hf(hf)
    assert float(got.rotary_base) == float(want["rope_theta"])
    assert got.rope_type == want["rope_type"] and got.rope_scaling_factor == want["factor"]


def test_mistral_and_qwen2_sliding_window_as_transformers_reads_it() -> None:
    from transformers import MistralConfig, Qwen2Config

    from megatron_longctx.convert.hf_llama import ConversionError, model_config_from_hf

    base = {k: v for k, v in _hf_dict().items() if k not in ("architectures", "model_type")}
    # Mistral ignores use_sliding_window; without the key its window is 4096
    for extra in ({"use_sliding_window": False, "sliding_window": 4096}, {}):
        hf = {**base, "model_type": "mistral", "architectures": ["MistralForCausalLM"], **extra}
        assert MistralConfig(**{k: v for k, v in hf.items()
                                if k != "model_type"}).sliding_window == 4096
        with pytest.raises(ConversionError, match="sliding_window 4096"):
            model_config_from_hf(hf)
    # Qwen2 applies its window only with use_sliding_window (default false)
    hf = {**base, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
          "sliding_window": 4096}
    assert Qwen2Config(**{k: v for k, v in hf.items() if k != "model_type"}).sliding_window \
        is None
    assert model_config_from_hf(hf).add_qkv_bias


NON_PHYSICAL = [
    ({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}}, "rope_scaling.factor"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": float("inf")}},
     "rope_scaling.factor"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.0,
                          "original_max_position_embeddings": 64}},
     "rope_parameters.attention_factor"),
    ({"rope_theta": 0.0}, "rope_theta"),
    ({"rope_theta": float("nan")}, "rope_theta"),
]


@pytest.mark.parametrize(("changes", "what"), NON_PHYSICAL,
                         ids=["nan-factor", "inf-factor", "zero-attention", "zero-theta",
                              "nan-theta"])
def test_converter_refuses_non_physical_rope(tiny_models, tmp_path, capsys,  # noqa: F811
                                             changes, what) -> None:
    """These converted and then answered NaN (or nothing)."""
    model = copy_tree(tiny_models["hf"], tmp_path / "hf")
    config = json.loads((model / "config.json").read_text())
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):
        config.pop(key, None)
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))
    module = _tool("convert_checkpoint")
    capsys.readouterr()
    assert module.main(_argv("h2m", model, tmp_path / "out", tmp_path)) == 2
    _assert_one_line(capsys.readouterr().err, "convert_checkpoint.py: error: ", "config.json",
                     what)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [
    ["--rope-type", "linear", "--rope-scaling-factor", "nan"],
    ["--rope-type", "yarn", "--rope-scaling-factor", "4", "--rope-attention-factor", "inf",
     "--rope-original-max-position-embeddings", "32"],
    ["--rope-type", "yarn", "--rope-scaling-factor", "4", "--yarn-beta-fast", "nan",
     "--rope-original-max-position-embeddings", "32"],
    ["--rope-type", "yarn", "--rope-scaling-factor", "4", "--rope-attention-factor", "0",
     "--rope-original-max-position-embeddings", "32"],
], ids=["nan-factor", "inf-attention", "nan-beta", "zero-attention"])
def test_trainer_flags_refuse_non_physical_rope(monkeypatch, capsys, flags) -> None:
    """NaN/inf passed validation and stopped at step 1 as "loss is nan" without a flag."""
    flag = next(f for f, v in zip(flags, flags[1:]) if v in ("nan", "inf", "0"))
    _refused(monkeypatch, capsys, [*TINY_RUN, "--train-iters", "1", *flags], flag)


# --------------------------------------------------------------------------------------------
# evaluation state is not carried between prompts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reuse", [False, True], ids=["prefill", "reuse-prefix"])
def test_hf_dynamic_ntk_answer_independent_of_previous_prompt(tmp_path, reuse) -> None:
    """transformers grows a dynamic-NTK model's frequencies on a long prompt and keeps them for
    a shorter one that is still past the original length: the same cell answered differently
    after a longer one (grid order, resume point)."""
    from megatron_longctx.eval.models import HFCausalLM
    from tests.unit.test_convert import make_hf

    make_hf(tmp_path / "hf", vocab_size=512, max_position_embeddings=32,
            rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    rng = np.random.default_rng(0)
    long, short = rng.integers(0, 512, 200).tolist(), rng.integers(0, 512, 48).tolist()
    fresh = HFCausalLM(tmp_path / "hf", dtype="fp32", prefill_chunk=0)
    want = fresh.generate(short, 8)
    want_losses = fresh.token_losses(short)
    fresh.close()
    model = HFCausalLM(tmp_path / "hf", dtype="fp32", prefill_chunk=0)
    model.generate(long, 8, reuse_prefix=reuse)
    assert model.generate(short, 8, reuse_prefix=reuse) == want
    model.generate(long, 8)
    np.testing.assert_array_equal(model.token_losses(short), want_losses)


# --------------------------------------------------------------------------------------------
# plans and weights files
# --------------------------------------------------------------------------------------------
def _two_domains(tmp_path: Path) -> list[str]:
    from tests.unit.mixture_fixtures import write_dataset as write_domain

    return [write_domain(str(tmp_path / f"{d.lower()}_text_document"), np.full(30, 50), d)
            for d in ("A", "B")]


def test_plan_whose_shares_do_not_sum_to_one_is_refused(tmp_path) -> None:
    """Megatron's BlendedDataset renormalised an edited plan's shares without a word."""
    from megatron_longctx.mixture.outputs import write_plan_outputs
    from megatron_longctx.mixture.plan import load_plan
    from megatron_longctx.mixture.planner import plan_mixture
    from tests.unit.test_faults_data import _plan_cfg

    prefixes = _two_domains(tmp_path)
    path = write_plan_outputs(plan_mixture(_plan_cfg(prefixes, tmp_path)),
                              str(tmp_path / "o"))["plan"]
    data = json.loads(Path(path).read_text())
    data["domains"][0]["target_share"] = data["domains"][0]["target_share"] / 2
    Path(path).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"mixture_plan\.json: domains: target_share values "
                                         r"sum to 0\.\d+, not 1"):
        load_plan(path)


def test_weights_file_not_summing_to_one_is_normalised_with_a_warning(tmp_path) -> None:
    from megatron_longctx.mixture.planner import plan_mixture
    from tests.unit.test_faults_data import _plan_cfg

    weights = tmp_path / "w.json"
    weights.write_text('{"A": 3, "B": 1}')
    plan = plan_mixture(_plan_cfg(_two_domains(tmp_path), tmp_path,
                                  domain_weights=str(weights)))
    assert [d.target_share for d in plan.domains] == [0.75, 0.25]
    assert any("weights sum to 4, not 1: normalised" in w for w in plan.warnings), plan.warnings


def test_duplicate_key_in_weights_file_is_refused(tmp_path) -> None:
    """`{"A": 1, "A": 3}` was resolved to the last value silently."""
    from megatron_longctx.mixture.planner import PlanError, plan_mixture
    from tests.unit.test_faults_data import _plan_cfg

    weights = tmp_path / "w.json"
    weights.write_text('{"A": 0.5, "B": 0.5, "A": 0.2}')
    with pytest.raises(PlanError, match=r"--domain-weights .*w\.json: duplicate key 'A'"):
        plan_mixture(_plan_cfg(_two_domains(tmp_path), tmp_path, domain_weights=str(weights)))


# --------------------------------------------------------------------------------------------
# haystacks without sentence boundaries still fill the prompt (with a warning)
# --------------------------------------------------------------------------------------------
def test_needle_haystack_without_sentence_ends_still_fills_the_prompt(hf_tokenizer_dir):
    """Every cut fell on the only boundary, token 0: prompts held no haystack at all."""
    from megatron_longctx.eval.models import EvalTokenizer
    from megatron_longctx.eval.needle import (
        PAPER_ANSWER,
        PAPER_TEMPLATE,
        Haystack,
        Needle,
        build_prompt,
    )

    tok = EvalTokenizer(hf_tokenizer_dir)
    words = " ".join(["river", "stone", "light", "garden", "window"] * 1200)  # no sentence end
    with pytest.warns(UserWarning, match="without a sentence end"):
        hay = Haystack.from_texts([words], tok, 2000, "words.txt")
    needle = Needle("The best thing is " + PAPER_ANSWER + ".", "What is best?", PAPER_ANSWER)
    prompt = build_prompt(hay, tok, needle, PAPER_TEMPLATE, 1024, 50.0)
    assert prompt.haystack_tokens > 800 and 40 < prompt.needle_depth < 60
    assert len(prompt.ids) <= 1024


def test_ruler_essay_without_sentence_ends_places_needles_inside(tmp_path):
    """All needles went before the essay (one 'sentence': every depth rounded to 0)."""
    from megatron_longctx.eval.ruler_tasks import TASKS, TaskResources, build_niah

    essay = tmp_path / "essay.txt"
    essay.write_text(" ".join(["river", "stone", "light", "garden", "window"] * 400))
    res = TaskResources.load(haystack_file=str(essay))
    before = []
    for seed in range(6):
        with pytest.warns(UserWarning, match="no sentence ends"):
            built = build_niah(TASKS["niah_single_2"], np.random.default_rng(seed), 500, res)
        before.append(built.text.split("One of the special magic")[0].count("garden"))
    assert max(before) > 10, before
