"""The layout's rules, checked on the source (ast, no import): what may import what, no cycles,
small modules, errors that know no transport, and a node install that needs nothing of the broker.

A rule broken here is a design decision to revisit, not a line to silence: README "Map of the
code" says where things belong.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("agent", "kbs", "keylease")
FIRST_PARTY = (*PRODUCT, "harness", "tests", "demo", "scripts")
MAX_MODULE_LINES = 400
BROKER_ONLY = ("sqlalchemy", "alembic", "psycopg", "prometheus_client", "grpc_health")


def _generated(path: Path) -> bool:
    return path.name.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"))


def _modules(*packages: str) -> Iterator[tuple[str, Path]]:
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            if _generated(path) or "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def _imports(path: Path, module: str, *, top_level_only: bool) -> set[str]:
    """Modules imported by ``path`` (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If | ast.Try | ast.With):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    children = getattr(node, field, [])
                    for child in children:
                        if isinstance(child, ast.ExceptHandler):
                            visit(child.body)
                    visit([c for c in children if isinstance(c, ast.stmt)])
            elif not top_level_only:
                visit([c for c in ast.walk(node) if isinstance(c, ast.Import | ast.ImportFrom)])

    visit(tree.body)
    return found


def _graph() -> dict[str, set[str]]:
    modules = dict(_modules(*PRODUCT))
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = _imports(path, name, top_level_only=True)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_no_import_cycles() -> None:
    """Module-level imports among the product's modules form no cycle, ``if TYPE_CHECKING:``
    imports included (a cycle in the types is one in the design). A function-level import in a
    CLI entry point is how an optional dependency is deferred, and is not counted."""
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("keylease", ("agent", "kbs", "harness", "tests")),
        ("agent", ("kbs", "harness", "tests", *BROKER_ONLY)),
        ("kbs", ("agent", "harness", "tests")),
        ("harness", ("tests",)),
    ],
)
def test_package_boundaries(package: str, forbidden: tuple[str, ...]) -> None:
    """The agent needs nothing of the broker; the shared package needs neither program."""
    wrong = [
        f"{name} imports {dep}"
        for name, path in _modules(package)
        for dep in sorted(_imports(path, name, top_level_only=False))
        if dep.split(".")[0] in forbidden
    ]
    assert not wrong, "\n".join(wrong)


def test_modules_are_small() -> None:
    big = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for _, path in _modules(*PRODUCT)
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not big, f"modules over {MAX_MODULE_LINES} lines (split by concern):\n" + "\n".join(big)


@pytest.mark.parametrize("module", ["agent/errors.py", "kbs/errors.py", "keylease/tomlfile.py"])
def test_errors_know_no_transport(module: str) -> None:
    """Error classes carry operator text only; status codes live in each servicer's table."""
    path = ROOT / module
    name = module.removesuffix(".py").replace("/", ".")
    deps = _imports(path, name, top_level_only=False)
    assert not [d for d in deps if d.split(".")[0] in ("grpc", "sqlalchemy")], deps


def test_no_import_time_side_effects_on_logging() -> None:
    """Only the CLIs configure logging; no module changes a logger when it is imported."""
    offenders = []
    for name, path in _modules(*PRODUCT):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                text = ast.unparse(node.value)
                if "getLogger(" in text or "basicConfig(" in text:
                    offenders.append(f"{name}: {text}")
    assert not offenders, "\n".join(offenders)
