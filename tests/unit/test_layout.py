"""The package layout reads as the data flow, and imports only go down it.

Layers (STYLE.md "The house"; README "Layout"), lowest first. A package may import from lower
layers only: not sideways (two packages of one layer stay independent) and never up.

    0  config                      typed dataclasses, presets, flag tables (no I/O)
    1  data, model, parallel       stage 1; layer specs / attention; process groups
    2  mixture, checkpoint         stage 2 (reads stage 1); the checkpoint format
    3  training, convert           the trainer; HF conversion
    4  eval                        needle / RULER / loss by position
    5  demo                        the demo pipeline: runs every stage on data.synthetic

The demo builds on the product and nothing in the product imports it: the synthetic corpus
(the needle and RULER tools' synthetic haystack and fact needles) lives in data.synthetic.

Also: no import cycle between modules, and no private (`_name`) import across modules.
The checks parse the source (no imports executed), so they run in well under a second.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_longctx"
LAYERS = {
    "config": 0,
    "data": 1, "parallel": 1,
    "model": 2,  # its packed-document attention and RoPE use parallel/thd.py's CP split
    "mixture": 3, "checkpoint": 3,
    "training": 4, "convert": 4,
    "eval": 5, "plan": 5,
    "demo": 6,
}
#: Top-level modules, usable from any layer: the compiled csrc extension (imported by
#: data.native), the one atomic-write helper, and the tools' shared process set-up (imported
#: only by tools/ and benchmarks/).
TOP_LEVEL = {"_csrc", "atomic", "identity", "tool_env"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    name = ".".join(("megatron_longctx", *parts))
    return name.removesuffix(".__init__")


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks (annotations only)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return inside


def _imports(*, runtime_only: bool = False) -> dict[str, list[tuple[str, str]]]:
    """module -> [(imported module, imported name or '')] for megatron_longctx imports
    (`runtime_only`: without the `if TYPE_CHECKING:` ones, which never execute)."""
    found: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree) if runtime_only else set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    node.module.split(".")[0] == "megatron_longctx":
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    is_module = (PACKAGE.parent / (target.replace(".", "/") + ".py")).exists() \
                        or (PACKAGE.parent / target.replace(".", "/")).is_dir() \
                        or alias.name in TOP_LEVEL
                    found[module].append((target, "") if is_module
                                         else (node.module, alias.name))
            elif isinstance(node, ast.Import):
                found[module].extend((a.name, "") for a in node.names
                                     if a.name.split(".")[0] == "megatron_longctx")
    return found


def _package(module: str) -> str:
    """The LAYERS key of a module: its package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == {k for k in LAYERS if "." not in k}, \
        "add new packages to LAYERS (and the README layout)"
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert modules <= TOP_LEVEL, f"top-level modules belong in a package: {modules - TOP_LEVEL}"


def test_imports_only_go_down_the_layers():
    wrong = []
    for module, targets in _imports().items():
        source = _package(module)
        for target, _ in targets:
            dest = _package(target)
            if dest == source or dest in TOP_LEVEL or source in TOP_LEVEL:
                continue
            if source not in LAYERS or dest not in LAYERS or LAYERS[dest] >= LAYERS[source]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


#: The demo's own entrypoints: the only files outside megatron_longctx/demo that may import it.
DEMO_ENTRYPOINTS = {"tools/demo.py", "tools/ablate_mixture.py"}


def test_product_never_imports_the_demo():
    """The demo builds on the product, not the other way round: no package module outside
    demo/ (lazy imports inside functions included), no other tool, benchmark or the
    trainer's entrypoint imports megatron_longctx.demo."""
    wrong = [f"{module} imports {target}" for module, targets in _imports().items()
             if _package(module) != "demo"
             for target, _ in targets if _package(target) == "demo"]
    root = PACKAGE.parent
    scripts = [*root.glob("tools/*.py"), *root.glob("benchmarks/*.py"), *root.glob("*.py")]
    for path in sorted(scripts):
        rel = path.relative_to(root).as_posix()
        if rel in DEMO_ENTRYPOINTS:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            names += [f"{node.module}.{a.name}" for a in getattr(node, "names", [])
                      if isinstance(node, ast.ImportFrom) and node.module]
            if any(n.startswith("megatron_longctx.demo") for n in names):
                wrong.append(f"{rel} imports megatron_longctx.demo")
                break
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    """Runtime imports only: a type annotation may name a class of a module that imports
    this one."""
    graph = {m: {t for t, _ in ts} for m, ts in _imports(runtime_only=True).items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node:
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_no_private_imports_across_modules():
    wrong = [f"{module} imports {name} from {target}"
             for module, targets in _imports().items()
             for target, name in targets
             if name.startswith("_") and name != "_csrc"]
    assert not wrong, "\n".join(wrong)


def test_no_function_over_80_lines():
    """Long functions hide several steps; the limit keeps each one readable (STYLE.md)."""
    long = []
    roots = [PACKAGE, PACKAGE.parent / "tools", PACKAGE.parent / "pretrain_longctx.py"]
    for root in roots:
        for path in sorted(root.rglob("*.py") if root.is_dir() else [root]):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 80:
                        long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} "
                                    f"{node.name} ({lines} lines)")
    assert not long, "\n".join(long)
