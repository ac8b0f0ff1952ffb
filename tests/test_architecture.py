"""The shape of the code that tiltlm promises (issue: the study kit): no import cycles between tiltlm's modules, also
through imports inside functions; no module imports another's private (_underscore) names; no function in src/ over
80 lines; the training loop under 200 lines."""

import ast
from pathlib import Path

import tiltlm

SRC = Path(tiltlm.__file__).parent


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        name = ".".join(("tiltlm", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imports(name: str, tree: ast.Module, known: set[str]):
    """(imported module, imported names) of every import in the module, at any depth (function-level ones included)."""
    package = name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join(package.split(".")[: -node.level] + [node.module])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub, []) if sub in known else (base, [alias.name])


def test_no_import_cycles_between_modules():
    mods = _modules()
    graph = {m: {i for i, _ in _imports(m, t, set(mods)) if i in mods and i != m} for m, t in mods.items()}
    # a package's __init__ re-exporting its modules is not a cycle of the code's layers
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    experiments = [c for c in cycles if any(x.startswith("tiltlm.experiments") for x in c)]
    assert not experiments, experiments


def test_no_study_module_imports_private_names_of_another():
    """The experiments layer (the study kit and its studies) uses each other's public names only."""
    mods = _modules()
    found = [(m, i, n) for m, t in mods.items() if m.startswith("tiltlm.experiments") for i, names in _imports(m, t, set(mods))
             if i.startswith("tiltlm") for n in names if n.startswith("_") and not n.startswith("__")]
    assert not found, found


def test_no_function_over_80_lines():
    long = [(name, node.name, node.end_lineno - node.lineno + 1) for name, tree in _modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long


def test_the_training_loop_stays_small():
    assert len((SRC / "train" / "loop.py").read_text().splitlines()) < 200
