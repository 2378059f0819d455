"""The package's layout, checked from its source: no import cycle (top level or inside
functions), no private name imported across modules, no module over about 500 lines, and no
function over 60 lines of code (its docstring apart) or 8 parameters unless its docstring
says why."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ppl_vae"
MAX_MODULE_LINES = 520  # "about 500"
MAX_FUNCTION_LINES, MAX_PARAMETERS = 60, 8
# what a docstring says to keep a function over those limits
WHY_LONG, WHY_MANY = "Why so long:", "Why so many parameters:"


def _modules():
    return {p.stem: ast.parse(p.read_text(), filename=str(p)) for p in PACKAGE.glob("*.py")}


def _imports(tree: ast.Module):
    """(module imported, names taken from it, line, inside a function) for each import of
    the package's own modules."""
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                target = node.module.split(".")[0]
            elif node.level == 0 and (node.module or "").startswith("ppl_vae."):
                target = node.module.split(".")[1]
            elif node.level == 1 or node.module == "ppl_vae":  # from . import a, b
                for alias in node.names:
                    yield alias.name, (), node.lineno, id(node) in inner
                continue
            else:
                continue
            yield target, tuple(a.name for a in node.names), node.lineno, id(node) in inner
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ppl_vae."):
                    yield alias.name.split(".")[1], (), node.lineno, id(node) in inner


def _graph():
    modules = _modules()
    return {m: {t for t, *_ in _imports(tree) if t in modules and t != m}
            for m, tree in modules.items()}


def _cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():  # the check below can fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_even_inside_functions():
    assert _cycles(_graph()) == []


# the package by layer, lowest first, as README.md's map shows it: a module imports only
# modules of its own layer or of layers before it
LAYERS = [
    ["errors", "logs", "rng", "seeds", "memory", "config", "registry", "config_file", "tracking"],
    ["data", "batching", "nets", "likelihoods", "priors", "families"],
    ["model", "objectives", "protocol", "guides"],
    ["compiled", "optim"],
    ["step", "local_fit", "distributed", "evaluate"],
    ["loopstate", "callbacks", "train", "heldout"],
    ["plots", "gap_plots"],
    ["build", "runfiles", "writelock", "checkpoint", "rundir", "run_setup", "run", "evaluation",
     "compute"],
    ["results", "compare_plan", "compare", "budget_curves", "report", "report_tables"],
    ["cli", "__main__", "__init__"],
]


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_layers():
    layer = {m: i for i, names in enumerate(LAYERS) for m in names}
    modules = _modules()
    assert sorted(set(modules) - set(layer)) == [] and sorted(set(layer) - set(modules)) == []
    upward = [f"{m} imports {target} (line {line})" for m, tree in modules.items()
              for target, _, line, _ in _imports(tree)
              if target in layer and layer[target] > layer[m]]
    assert upward == []


def test_no_private_name_is_imported_across_modules():
    found = [f"{m}:{line} imports {name} from {target}"
             for m, tree in _modules().items()
             for target, names, line, _ in _imports(tree)
             for name in names if name.startswith("_") and not name.startswith("__")]
    assert found == []


def test_the_readme_and_the_package_docstring_show_these_layers():
    """README.md's layer table and ``ppl_vae/__init__``'s docstring list the layers above,
    each module in its own layer (a module moved or added is moved or added there too)."""
    import re
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("| layer | modules |"):readme.index("More on each file")]
    rows = [re.findall(r"`(\w+)`", line.split("|")[2]) for line in table.splitlines()[2:]
            if line.startswith("|")]
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text()))
    parts = [re.findall(r"``(\w+)``", part) for part in doc.split(";")]
    layers = [[m for m in names if not m.startswith("__")] for names in LAYERS]
    modules = {m for names in layers for m in names}  # (a row names functions too)
    for shown in (rows, parts):
        assert [[m for m in names if m in modules] for names in shown if names] == layers


def test_in_function_imports_of_the_package_say_why():
    """An import of the package inside a function stays only to keep ``--help`` free of
    torch (cli.py) or with a comment on its line saying why."""
    found = []
    for p in PACKAGE.glob("*.py"):
        lines = p.read_text().splitlines()
        for target, _, line, inner in _imports(ast.parse("\n".join(lines))):
            if inner and p.stem != "cli" and "#" not in lines[line - 1]:
                found.append(f"{p.stem}:{line} imports {target} inside a function")
    assert found == []


def test_no_module_is_over_about_500_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert {n: s for n, s in sizes.items() if s > MAX_MODULE_LINES} == {}


def _parameters(fn) -> int:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    n = len(names) + (a.vararg is not None) + (a.kwarg is not None)
    return n - (1 if names and names[0] in ("self", "cls") else 0)


def test_no_function_is_over_60_lines_or_8_parameters_unless_it_says_why():
    found = []
    for m, tree in _modules().items():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(fn) or ""
            lines = fn.end_lineno - fn.lineno + 1  # its code: the docstring does not count
            first = fn.body[0]
            if doc and isinstance(first, ast.Expr):
                lines -= first.end_lineno - first.lineno + 1
            if lines > MAX_FUNCTION_LINES and WHY_LONG not in doc:
                found.append(f"{m}.{fn.name}: {lines} lines")
            if _parameters(fn) > MAX_PARAMETERS and WHY_MANY not in doc:
                found.append(f"{m}.{fn.name}: {_parameters(fn)} parameters")
    assert found == []


@pytest.mark.parametrize("name", ["cli"])
def test_the_command_lines_help_imports_no_torch(name):
    import subprocess
    import sys
    code = ("import sys, ppl_vae.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    assert out == "False"
