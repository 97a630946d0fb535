"""The data pipeline through the real cluster: preprocessing array + dependent merge/blend job.

A 3-task array over a 6-file synthetic SlimPajama corpus, then examples/blend_data.sh after
afterok, must give .bin/.idx (and stats) byte-identical to one unsharded run of
tools/preprocess_data.py, and a mixture plan with its blend files and report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longctx.data.synthetic import CorpusConfig, write_corpus

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
DOMAIN_KEY = "meta.redpajama_set_name"

pytestmark = pytest.mark.slurm


def _pipeline_env(cluster, tmp_path: Path, corpus: Path, tokenizer: str) -> dict[str, str]:
    env = dict(cluster.env)
    env.update(
        PYTHON=sys.executable, DATA_DIR=str(tmp_path / "data"), INPUT=str(corpus),
        TOKENIZER_TYPE="HuggingFaceTokenizer", TOKENIZER_MODEL=tokenizer, WORKERS="1",
        ARRAY="0-2", SBATCH_ARGS="--cpus-per-task=1",
        # A corpus of ~350K tokens: a 256-token "long" threshold and 200K training tokens at
        # length 512 keep the planner's repeat factors sane.
        LONG_THRESHOLD="256", TRAIN_TOKENS="2e5", SEQ_LENGTH="512", VALID_FRACTION="0.01",
    )
    if "MEGATRON_LONGCTX_CACHE" in os.environ:  # the session's tokenizer cache (tests/conftest)
        env["MEGATRON_LONGCTX_CACHE"] = os.environ["MEGATRON_LONGCTX_CACHE"]
    return env


def _check_done(cluster, job_id: int, tasks: int) -> None:
    records = cluster.job_records(job_id)
    assert len(records) == tasks, records
    for record in records:
        assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), record


def test_array_then_blend_equals_unsharded_run(slurm_cluster, tmp_path, hf_tokenizer_dir):
    corpus = tmp_path / "corpus"
    write_corpus(CorpusConfig(total_words=150_000, num_files=6, seed=5), corpus)
    reference = tmp_path / "one" / "slimpajama"  # same basename: stats name it
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(corpus),
         "--output-prefix", str(reference), "--tokenizer-type", "HuggingFaceTokenizer",
         "--tokenizer-model", hf_tokenizer_dir, "--append-eod", "--domain-key", DOMAIN_KEY,
         "--workers", "1"],
        check=True, capture_output=True, cwd=REPO, timeout=120)

    env = _pipeline_env(slurm_cluster, tmp_path, corpus, hf_tokenizer_dir)
    # Run the wrapper from elsewhere: it must find the repository by itself.
    proc = subprocess.run(["bash", str(EXAMPLES / "submit_data_pipeline.sh")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ids = dict(line.split() for line in proc.stdout.splitlines())
    prep_id, blend_id = int(ids["prepare"]), int(ids["blend"])
    slurm_cluster.wait_job(blend_id, timeout=240)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("longctx-*.out")))
    _check_done(slurm_cluster, prep_id, tasks=3)
    _check_done(slurm_cluster, blend_id, tasks=1)

    shards = sorted((tmp_path / "data" / "shards").glob("slimpajama.shard*-of00003.done.json"))
    assert len(shards) == 3, logs
    merged = tmp_path / "data" / "merged" / "slimpajama"
    ref_files = sorted(reference.parent.glob("slimpajama_*_text_document.*"))
    assert len(ref_files) == 3 * 7  # .bin, .idx, .stats.json for each of the seven domains
    for ref in ref_files:
        other = merged.parent / ref.name
        if ref.suffix == ".json":
            assert json.loads(ref.read_text()) == json.loads(other.read_text()), ref.name
        else:
            assert ref.read_bytes() == other.read_bytes(), ref.name

    mix = tmp_path / "data" / "mix"
    plan = json.loads((mix / "mixture_plan.json").read_text())
    assert plan["strategy"] == "per-source" and len(plan["domains"]) == 7
    for name in ("blend.txt", "blend_per_split.json", "report.md"):
        assert (mix / name).stat().st_size > 0, name
    assert "(tolerance 1.0%): OK" in logs  # --audit ran and realized shares match the plan

    # Resubmitting the array redoes nothing: every shard's marker matches its configuration.
    job_id, rc = slurm_cluster.sbatch(
        ["--array=0-2", "--cpus-per-task=1", f"--output={tmp_path}/rerun-%a.out",
         str(EXAMPLES / "prepare_data.sh")], env=env, cwd=REPO, timeout=120)
    assert rc == 0
    for task in range(3):
        assert "already complete" in (tmp_path / f"rerun-{task}.out").read_text()
