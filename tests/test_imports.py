"""Imports run one way: no module of src/ or ablations/ imports, directly or through others, a module that
imports it back. Read from the source (no import is executed); imports inside functions count too, and
importing `a.b.c` counts as importing the packages `a` and `a.b` as well (Python runs their __init__ first)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_modules(root: Path, tops: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the given top-level folders."""
    modules = {}
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets += [base] + [f"{base}.{alias.name}" for alias in node.names]
        deps = set()
        for target in targets:
            head = target.split(".")[0]
            if head not in {m.split(".")[0] for m in modules} and f"{package}.{head}" in modules:
                target = f"{package}.{target}"  # a sibling imported by its bare name (script folder on sys.path)
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                module = ".".join(parts[:i])
                if module in modules and module != name and not name.startswith(module + "."):
                    deps.add(module)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycle_in_src_and_ablations():
    modules = project_modules(ROOT, ("src", "ablations"))
    assert "src.models.classifier" in modules and "ablations.run" in modules
    graph = import_graph(modules)
    assert "src.checkpoints" in graph["src.models.classifier"]
    assert find_cycles(graph) == []


def test_the_walker_finds_cycles(tmp_path):
    """The check above can fail: a package cycle through __init__, a relative import inside a function, and
    two scripts importing each other by bare name are all found."""
    for rel, text in {
        "pkg/__init__.py": "from .a import x\n",
        "pkg/a.py": "def f():\n    from pkg.b import y\n",
        "pkg/b.py": "import pkg.c\n",
        "pkg/c.py": "from pkg import a\n",
        "tools/run.py": "def g():\n    import report\n",
        "tools/report.py": "from run import AXES\n",
        "tools/alone.py": "import os\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    cycles = find_cycles(import_graph(project_modules(tmp_path, ("pkg", "tools"))))
    assert ["pkg.a", "pkg.b", "pkg.c", "pkg.a"] in cycles  # c imports a (as `from pkg import a`)
    assert ["tools.report", "tools.run", "tools.report"] in cycles
    assert not any("tools.alone" in c for c in cycles)


def test_no_sys_path_edits_outside_benchmarks():
    """The project is installed (`pip install -e .`): `src` and `ablations` import by name from anywhere, so no
    module but the stand-alone benchmark scripts changes `sys.path` (assignments, insert, append, extend)."""
    edits = []
    for path in [ROOT / "main.py", *sorted(ROOT.glob("src/**/*.py")), *sorted(ROOT.glob("ablations/**/*.py")),
                 *sorted(ROOT.glob("tests/**/*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
            targets = [target] if target is not None else getattr(node, "targets", [])
            if any(ast.unparse(t).startswith("sys.path") for t in targets if t is not None):
                edits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert edits == []
    assert "ablations" in {p.name for p in ROOT.iterdir()} and (ROOT / "ablations" / "__init__.py").is_file()
