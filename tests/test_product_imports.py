"""Dependencies point down: product modules never import the test-support package
`megatron_terapipe.testing`, the test support never imports the benchmark, and one module
builds megatron-core's TransformerConfig."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "megatron_terapipe")
TESTING = os.path.join(PACKAGE, "testing")


def _product_modules():
    for folder, _, files in os.walk(PACKAGE):
        if folder.startswith(TESTING):
            continue
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def _tree(path: str) -> ast.AST:
    with open(path, encoding="utf-8") as handle:
        return ast.parse(handle.read(), path)


def _imports_of(path: str, package: str) -> list[str]:
    """Every name `path` imports from `package` (a dotted name), module-level or not."""
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [n for n in names if n == package or n.startswith(package + ".")]
    return found


def _imports_testing(path: str) -> list[str]:
    return _imports_of(path, "megatron_terapipe.testing")


def _package_modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def _constructs_transformer_config(path: str) -> bool:
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name == "TransformerConfig":
                return True
    return False


def test_no_product_module_imports_testing():
    offenders = {os.path.relpath(p, ROOT): hits for p in _product_modules()
                 if (hits := _imports_testing(p))}
    assert not offenders, offenders


def test_testing_does_not_import_the_benchmark():
    """The tests' support sits below the benchmark: what both need lives in product modules."""
    offenders = {}
    for folder, _, files in os.walk(TESTING):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and (hits := _imports_of(path, "megatron_terapipe.benchmark")):
                offenders[os.path.relpath(path, ROOT)] = hits
    assert not offenders, offenders


def test_one_module_constructs_transformer_config():
    """Every model config comes from `model.transformer_config` (trainer, benchmark, tests'
    reference, GPU check and profiler alike), so they cannot drift apart."""
    builders = sorted(os.path.relpath(p, ROOT) for p in _package_modules()
                      if _constructs_transformer_config(p))
    assert builders == ["megatron_terapipe/model/transformer_config.py"], builders


def test_scripts_and_benchmark_load_without_testing():
    """Importing the benchmark, trainer and demo leaves megatron_terapipe.testing unloaded."""
    code = (
        "import sys, megatron_terapipe.benchmark.harness, megatron_terapipe.benchmark.compare, "
        "megatron_terapipe.benchmark.cli_args, megatron_terapipe.training.pretrain, "
        "megatron_terapipe.training.demo, megatron_terapipe.simulate.cli; "
        "print(sorted(m for m in sys.modules if m.startswith('megatron_terapipe.testing')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_timeline_does_not_import_the_plot_module():
    """simulate.plot draws Timelines; simulate.timeline must not import it back (no circle)."""
    path = os.path.join(PACKAGE, "simulate", "timeline.py")
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    modules = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names]
    assert not [m for m in modules if m and m.startswith("megatron_terapipe.simulate.plot")]


def _upward_imports(folder: str, forbidden: str) -> dict[str, list[str]]:
    """Modules under megatron_terapipe/`folder` that import `forbidden` (or a submodule)."""
    offenders = {}
    for parent, _, files in os.walk(os.path.join(PACKAGE, folder)):
        for name in files:
            path = os.path.join(parent, name)
            if name.endswith(".py") and (hits := _imports_of(path, forbidden)):
                offenders[os.path.relpath(path, ROOT)] = hits
    return offenders


def test_slicing_does_not_import_the_argument_layer():
    """arguments.py is the top command-line layer and imports slicing; what both need (the
    cost-model spec, its default) lives lower, in flag_values."""
    assert _upward_imports("slicing", "megatron_terapipe.arguments") == {}


def test_simulate_does_not_import_the_plan_cli():
    """terapipe-simulate shares helpers with terapipe-plan through flag_values, not through
    slicing.cli (a command-line module above both)."""
    assert _upward_imports("simulate", "megatron_terapipe.slicing.cli") == {}


def _module_name(path: str) -> str:
    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports anywhere in its body (top level, inside functions,
    under TYPE_CHECKING): a lazy or type-only import is still a dependency."""
    paths = {_module_name(p): p for p in _package_modules()}

    def resolve(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), path)
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            targets |= {t for n in names if n.startswith("megatron_terapipe")
                        and (t := resolve(n)) and t != module}
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_among_package_modules():
    """Dependencies point one way: no two modules import each other, directly or around a
    circle, not even through a lazy or type-only import."""
    graph = _import_graph()
    assert "megatron_terapipe.benchmark.host_noise" in graph["megatron_terapipe.benchmark.compare"]
    assert _cycles(graph) == []
    # the check sees a circle closed by a lazy import
    graph["megatron_terapipe.benchmark.host_noise"] = {"megatron_terapipe.benchmark.compare"}
    (circle,) = _cycles(graph)
    assert {"megatron_terapipe.benchmark.compare",
            "megatron_terapipe.benchmark.host_noise"} <= set(circle)
