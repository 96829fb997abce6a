"""The shape of the package (docs/design.md, "Layout"): the import direction between
subpackages, no import cycles, the arrows that must never exist, and the size rule for
classes and functions. Read from the source with ast, so it holds for every module,
imported by a test or not. Imports under `if TYPE_CHECKING:` are for annotations only
and never run, so they are not edges."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "daemon" / "ingestd"

MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 80
LONG_MARK = "# long:"  # the comment, on the line above, that says why a body is longer

# Modules of the sync step (claim → prepare → send → outcome): they read files only
# through the Source they are handed, never through a source implementation.
SYNC_STEP = {"sync", "pool", "prepare", "send", "outcome", "hashing", "side"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _walk_runtime(node: ast.AST) -> Iterator[ast.AST]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            yield from (n for s in child.orelse for n in [s, *_walk_runtime(s)])
            continue
        yield child
        yield from _walk_runtime(child)


def imports_of(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The ingestd modules `name` imports when it runs (lazy imports in functions too)."""
    out: set[str] = set()
    for node in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from ingestd.x import y`: y may be a submodule or a name in ingestd.x.
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                for a in node.names
            ]
        else:
            continue
        out |= {t for t in targets if t.split(".")[0] == "ingestd" and t != name}
    return out


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: imports_of(name, tree, known) for name, tree in trees.items()}


def layer(module: str) -> str:
    """The role a module belongs to: its subpackage, or itself at the top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ingestd"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_graph_reads_real_imports() -> None:
    g = graph()
    # Guards the reader itself: a broken parser would find no edges and pass the rest.
    assert "ingestd.pipeline.runner" in g
    assert "ingestd.core.source" in g["ingestd.pipeline.runner"]
    assert "ingestd.config" in g["ingestd.plan.groups"]


def test_no_module_imports_one_that_imports_it_back() -> None:
    g = graph()
    # A package's __init__ importing its own modules is how a package exposes them.
    edges = {
        n: {m for m in ms if not (n.startswith(m + ".") or m.startswith(n + "."))}
        for n, ms in g.items()
    }
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges) or [])}"


def test_no_cycles_between_subpackages() -> None:
    layers: dict[str, set[str]] = {}
    for n, ms in graph().items():
        layers.setdefault(layer(n), set()).update(layer(m) for m in ms if layer(m) != layer(n))
    # The top-level `ingestd` package exposes the public names of the layers below it.
    layers.pop("ingestd", None)
    for deps in layers.values():
        deps.discard("ingestd")
    cycle = find_cycle(layers)
    assert cycle is None, f"subpackage cycle: {' -> '.join(cycle or [])}"


def test_core_imports_nothing_else() -> None:
    for n, ms in graph().items():
        if layer(n) == "core":
            assert {layer(m) for m in ms} <= {"core"}, f"{n} imports {ms}"


def test_the_arrows_that_must_not_exist() -> None:
    bad = []
    for n, ms in graph().items():
        parts = n.split(".")
        for m in ms:
            if parts[1:2] == ["pipeline"] and parts[-1] in SYNC_STEP and layer(m) == "sources":
                bad.append(f"the sync step reads through its Source: {n} imports {m}")
            if layer(n) == "sinks" and layer(m) == "sources":
                bad.append(f"sinks never import sources: {n} imports {m}")
            if layer(n) in ("plan", "media") and layer(m) in ("sinks", "ledger"):
                bad.append(f"plan/ and media/ are below sinks and the ledger: {n} imports {m}")
            if layer(n) == "config" and layer(m) not in ("core", "config"):
                bad.append(f"config validates against core types only: {n} imports {m}")
    assert bad == []


def test_sync_step_modules_exist() -> None:
    # The arrow rule above names these modules: if they are renamed, rename them there.
    names = {p.stem for p in (PACKAGE / "pipeline").glob("*.py")}
    assert names & SYNC_STEP, names


def _long_bodies() -> Iterator[str]:
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.ClassDef):
                limit = MAX_CLASS_LINES
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit = MAX_FUNCTION_LINES
            else:
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            above = lines[first - 2].strip() if first >= 2 else ""
            if size > limit and not above.startswith(LONG_MARK):
                yield f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({size} lines)"


def test_no_long_class_or_function_without_a_reason() -> None:
    long = sorted(_long_bodies())
    assert long == [], "over the size rule without a `# long: why` comment above:\n" + "\n".join(
        long
    )
