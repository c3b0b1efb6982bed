"""Rules of the code itself, checked on the source with ``ast`` (no imports, no JAX).

Call any function with more than three parameters by keyword: a positional call once sent the batch
size into another parameter and silently turned off per-row solving. Inside ``dpmjax/`` no call to
a function defined in dpmjax may pass more than three positional arguments; pass the fourth and later
ones by keyword (or make them keyword-only with ``*``, which Python then enforces).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "dpmjax"
MAX_POSITIONAL = 3

# Files whose calls are not checked (their definitions still count as dpmjax functions).
EXCLUDED_FILES: Set[str] = set()

# Names of dpmjax functions that common libraries also use for their own functions and methods, so
# that a call by that name alone cannot be told apart (calls are matched by name, without types).
# Empty at present: every name defined in dpmjax is checked; add a name here only with the library
# call that makes it ambiguous.
AMBIGUOUS_NAMES: Set[str] = set()

# Callables that wrap a function and keep its parameters: ``name = jax.jit(f, ...)``,
# ``functools.lru_cache(...)(f)`` and ``jax.jit(f)(...)`` are calls of ``f``.
WRAPPERS = {"jit", "lru_cache", "cache", "checkpoint", "remat", "wraps"}


def _sources() -> Dict[str, ast.Module]:
    return {path.relative_to(PACKAGE).as_posix(): ast.parse(path.read_text(), filename=str(path))
            for path in sorted(PACKAGE.rglob("*.py"))}


def _callable_name(node) -> str | None:
    """The last part of a dotted name (``f``, ``module.f``, ``self.f``), else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _wrapped(node, known: Set[str]) -> str | None:
    """The dpmjax function ``node`` evaluates to: a known name, a wrapper applied to one
    (``jax.jit(f, ...)``, ``functools.lru_cache(...)(f)``), or either branch of ``a if c else b``."""
    name = _callable_name(node)
    if name is not None:
        return name if name in known else None
    if isinstance(node, ast.IfExp):
        return _wrapped(node.body, known) or _wrapped(node.orelse, known)
    if isinstance(node, ast.Call) and node.args:
        wrapper = node.func.func if isinstance(node.func, ast.Call) else node.func
        if _callable_name(wrapper) in WRAPPERS:
            return _wrapped(node.args[0], known)
    return None


def _dpmjax_functions(modules: Dict[str, ast.Module]) -> Set[str]:
    """Names of every ``def`` and ``class`` in dpmjax (a record's fields are its constructor's
    parameters), and of names bound to one through a wrapper
    (``scan_steps_jit = jax.jit(scan_steps, ...)``, ``run = a_jit if donate else b_jit``)."""
    known = {node.name for tree in modules.values() for node in ast.walk(tree)
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    while True:
        aliases = {target.id for tree in modules.values() for node in ast.walk(tree) if isinstance(node, ast.Assign)
                   for target in node.targets if isinstance(target, ast.Name) and _wrapped(node.value, known)}
        if aliases <= known:
            return known - AMBIGUOUS_NAMES
        known |= aliases


def _parameters(node) -> Set[str]:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return set(names)


class _Calls(ast.NodeVisitor):
    """Calls of dpmjax functions with too many positional arguments. A callee that is a parameter of
    an enclosing function (a user's ``model(x, t, c, params)``) is the caller's, not dpmjax's."""

    def __init__(self, known: Set[str]):
        self.known = known
        self.scopes: List[Set[str]] = []
        self.found: List[tuple] = []

    def _scoped(self, node):
        self.scopes.append(_parameters(node))
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scoped

    def visit_Call(self, node: ast.Call):
        name = _wrapped(node.func, self.known)
        is_parameter = isinstance(node.func, ast.Name) and any(node.func.id in scope for scope in self.scopes)
        positional = sum(not isinstance(a, ast.Starred) for a in node.args)
        if name is not None and not is_parameter and positional > MAX_POSITIONAL:
            self.found.append((node.lineno, name, positional))
        self.generic_visit(node)


def offending_calls(modules: Dict[str, ast.Module]) -> Iterator[str]:
    known = _dpmjax_functions(modules)
    for path, tree in modules.items():
        if path in EXCLUDED_FILES:
            continue
        calls = _Calls(known)
        calls.visit(tree)
        for line, name, positional in calls.found:
            yield f"dpmjax/{path}:{line} {name} ({positional} positional arguments)"


def test_dpmjax_functions_are_called_with_at_most_three_positional_arguments():
    found = list(offending_calls(_sources()))
    assert not found, (
        f"pass the arguments after the {MAX_POSITIONAL}rd by keyword (or make them keyword-only with *):\n"
        + "\n".join(found))


def test_the_check_finds_a_positional_call():
    """The check itself: a call with four positional arguments is reported (a def, a jitted alias,
    a method, a wrapper called at once); keywords, starred arguments and parameters are not."""
    source = '''
import jax
def f(a, b, c, d=0):
    return a
f_jit = jax.jit(f, static_argnums=(0,))
run = f_jit if True else f
def user(model):
    model(1, 2, 3, 4)
    f(1, 2, 3, d=4)
    f(*(1, 2, 3, 4))
    f(1, 2, 3, 4)
    run(1, 2, 3, 4)
    object.f(1, 2, 3, 4)
    jax.jit(f)(1, 2, 3, 4)
'''
    found = list(offending_calls({"example.py": ast.parse(source)}))
    assert [line.split(" ")[0:2] for line in found] == [
        ["dpmjax/example.py:11", "f"], ["dpmjax/example.py:12", "run"], ["dpmjax/example.py:13", "f"],
        ["dpmjax/example.py:14", "f"]], found


# ----------------------------------------------------------------------------- layers
# Each layer imports only from itself and the layers listed for it: numerics knows nothing about
# diffusion, the core knows nothing about whole trajectories, and nothing in the library imports the
# programs in apps/.
LAYERS = {
    "numerics": {"numerics"},
    "core": {"core", "numerics"},
    "trajectories": {"trajectories", "core", "numerics"},
    "models": {"models", "trajectories", "core", "numerics"},
    "apps": {"apps", "models", "trajectories", "core", "numerics"},
}
# the host-side libraries only programs use
PROGRAM_LIBRARIES = {"matplotlib", "tensorstore", "threading", "argparse", "signal", "socket"}
# the one script that lives beside the library: the shipped digits models' training script sits with
# the weights it writes (python -m dpmjax.models.digits.train)
SCRIPTS = {"models/digits/train.py"}
# the one library module that takes a lock: the static-argument caches, which the batch job's worker
# threads share (for threading.Lock; the threads themselves are the programs')
LOCKED = {"static_cache.py": "threading"}


def _layer(module: str) -> str:
    """``dpmjax.a.b`` -> its layer: the top-level modules are the core; the package's namespace
    (``dpmjax``, its ``__init__`` and ``__main__``) gathers every layer, like a program."""
    parts = module.split(".")
    if module in ("dpmjax", "dpmjax.__init__", "dpmjax.__main__"):
        return "apps"
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "core"


def _imports(path: Path) -> Iterator[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    package = ".".join(("dpmjax",) + path.relative_to(PACKAGE).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if node.level and not node.module:  # from .. import x: x is a module of that package
                yield from (f"{module}.{alias.name}" for alias in node.names)
            else:
                yield module


def test_each_layer_imports_only_the_layers_below_it():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("dpmjax",) + path.relative_to(PACKAGE).with_suffix("").parts)
        layer = _layer(name)
        for module in _imports(path):
            if module == "dpmjax" or module.startswith("dpmjax."):
                target = _layer(module)
                if target not in LAYERS[layer]:
                    offences.append(f"{path.relative_to(PACKAGE)} ({layer}) imports {module} ({target})")
            elif layer != "apps" and module.split(".")[0] in PROGRAM_LIBRARIES and \
                    str(path.relative_to(PACKAGE)) not in SCRIPTS and LOCKED.get(str(path.relative_to(PACKAGE))) != module:
                offences.append(f"{path.relative_to(PACKAGE)} ({layer}) imports {module}, a library of the programs")
    assert not offences, "\n".join(offences)


# ----------------------------------------------------------------------------- import cycles
# No module of dpmjax imports, directly or through others, a module that imports it back. Every import
# counts: at the top of a file, inside a function (where a circle hides best: it runs later, so Python
# does not complain) and under ``if TYPE_CHECKING:`` (a type checker follows it). A module that needs
# something from a module above it takes it as an argument instead.


def _module_name(path: Path) -> str:
    """``dpmjax/a/b.py`` -> ``dpmjax.a.b``; a package's ``__init__.py`` -> the package's name."""
    parts = ("dpmjax",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str, modules: Set[str]) -> bool:
    return any(other.startswith(name + ".") for other in modules)


def import_edges(sources: Dict[str, str]) -> Dict[str, Set[str]]:
    """The import graph of a package: for each module (``dpmjax.a.b``; a package stands for its
    ``__init__``), the modules of the package it imports, relative imports resolved.

    ``from X import y`` imports the module ``X.y`` when there is one, else ``X`` (where ``y`` is a
    name defined in ``X``). The parent packages Python initialises on the way to a module are not
    edges: ``dpmjax/__init__.py`` gathers every layer, and only an explicit import of the package by
    one of its modules closes a circle through it.

    Args:
        sources: Module name -> its source text; a package (a name other modules sit under) is
            keyed by its own name and maps to its ``__init__``'s text.
    """
    modules = set(sources)
    edges: Dict[str, Set[str]] = {}
    for name, source in sources.items():
        package = name if _is_package(name, modules) else name.rsplit(".", 1)[0]  # what relative imports start from
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    submodule = f"{module}.{alias.name}"
                    targets.add(submodule if submodule in modules else module)
        edges[name] = {target for target in targets if target in modules and target != name}
    return edges


def find_cycle(edges: Dict[str, Set[str]]) -> List[str]:
    """One import circle ``[a, b, ..., a]`` of the graph, or ``[]`` if it has none (depth-first
    search; modules visited in sorted order, so the circle reported is always the same)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: finished (no circle through it)
    path: List[str] = []

    def visit(module: str) -> List[str]:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[module] = 2
        return []

    for module in sorted(edges):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return []


def import_cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """One circle of each group of modules that import each other (a strongly connected component)."""
    def reachable(module: str) -> Set[str]:
        seen, todo = set(), [module]
        while todo:
            for target in edges.get(todo.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    reach = {module: reachable(module) for module in edges}
    groups = {frozenset(other for other in edges if other in reach[module] and module in reach[other])
              for module in edges if module in reach[module]}
    return sorted(find_cycle({module: edges[module] & group for module in group}) for group in groups)


def _package_sources() -> Dict[str, str]:
    return {_module_name(path): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_no_import_cycles():
    cycles = import_cycles(import_edges(_package_sources()))
    assert not cycles, "import circles (a module that needs something from a module above it takes it as an " \
        "argument instead):\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_cycle_check_finds_circles():
    """The check itself: a circle closed by an import inside a function, by ``from . import x``, by
    ``from .x import name``, through a package's ``__init__``, or under ``TYPE_CHECKING`` is found;
    imports of outside libraries and of a module's own package's submodules in a line are not circles."""
    def cycle(**files: str) -> List[str]:
        return find_cycle(import_edges({"p." + name.replace("__", "."): text for name, text in files.items()} | {"p": ""}))

    assert cycle(a="import numpy\nfrom . import b", b="from .c import f", c="import os") == []
    assert cycle(a="from . import b", b="def f():\n    from .a import g") == ["p.a", "p.b", "p.a"]
    assert cycle(a="from .b import f", b="from . import a") == ["p.a", "p.b", "p.a"]
    assert cycle(a="from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B",
                 b="import p.a") == ["p.a", "p.b", "p.a"]
    assert cycle(q="from . import m", q__m="from .. import q") == ["p.q", "p.q.m", "p.q"]
    assert cycle(q="from .m import f", q__m="from . import g") == ["p.q", "p.q.m", "p.q"]
    assert cycle(q="", q__m="from ..a import f", a="from .q.n import g", q__n="") == []
    two = import_edges({"p": "", "p.a": "from . import b", "p.b": "import p.a", "p.c": "from .d import f",
                        "p.d": "from .c import g\nfrom .a import h"})
    assert import_cycles(two) == [["p.a", "p.b", "p.a"], ["p.c", "p.d", "p.c"]]


# ----------------------------------------------------------------------------- one definition
def _public_names() -> List[str]:
    """``dpmjax.__all__``, read from the source."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [element.value for element in node.value.elts]
    raise AssertionError("dpmjax/__init__.py defines no __all__")


def definitions(modules: Dict[str, ast.Module], names: Set[str]) -> Dict[str, List[str]]:
    """For each of ``names``, the modules that define it at their top level (``def``, ``class`` or
    an assignment; imports do not count, nor a class extending the one of that name under its own
    name: the diffusers pipelines' scheduler must carry diffusers' class name)."""
    found: Dict[str, List[str]] = {name: [] for name in names}
    for path, tree in modules.items():
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                bound = set() if node.name in {_callable_name(base) for base in node.bases} else {node.name}
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                bound = {node.name}
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                bound = {t.id for t in targets if isinstance(t, ast.Name)}
            else:
                continue
            for name in bound & names:
                found[name].append(path)
    return found


def test_each_public_name_is_defined_in_one_module():
    """``dpmjax.ModelFn``, ``dpmjax.__version__`` and every other public name has one definition,
    which the other modules import (a second copy drifts: two version numbers, two model types)."""
    found = definitions(_sources(), set(_public_names()))
    wrong = {name: paths for name, paths in found.items() if len(paths) != 1}
    assert not wrong, f"defined in several modules, or in none: {wrong}"
    assert definitions({"a.py": ast.parse("ModelFn = 1"), "b.py": ast.parse("from a import ModelFn\nclass ModelFn: ..."),
                        "c.py": ast.parse("import a\nclass ModelFn(a.ModelFn, object): ...")},
                       {"ModelFn"}) == {"ModelFn": ["a.py", "b.py"]}


# ----------------------------------------------------------------------------- sizes
MAX_FUNCTION_LINES, MAX_PUBLIC_PARAMETERS, MAX_FILE_LINES = 100, 14, 600
# Files allowed past MAX_FILE_LINES, each with the reason.
LONG_FILES = {
    "trajectories/exact.py": "one algorithm: its stages over one problem record, and the implicit derivative "
                             "registered on the function that assembles them (a custom_jvp lives beside its primal)",
}


def _code_lines(function: ast.FunctionDef) -> int:
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
            isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring does not count
    return 0 if not body else body[-1].end_lineno - body[0].lineno + 1


def _parameter_count(function: ast.FunctionDef) -> int:
    a = function.args
    return len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)


def test_functions_are_short_public_calls_take_few_parameters_and_files_stay_small():
    """Every function's code (docstring excluded) <= 100 lines; every public function <= 14
    parameters; every file <= 600 lines unless ``LONG_FILES`` says why."""
    offences = []
    for name, tree in _sources().items():
        lines = (PACKAGE / name).read_text().count("\n")
        if lines > MAX_FILE_LINES and name not in LONG_FILES:
            offences.append(f"{name}: {lines} lines")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if _code_lines(node) > MAX_FUNCTION_LINES:
                offences.append(f"{name}:{node.lineno} {node.name}: {_code_lines(node)} lines of code")
            if not node.name.startswith("_") and _parameter_count(node) > MAX_PUBLIC_PARAMETERS:
                offences.append(f"{name}:{node.lineno} {node.name}: {_parameter_count(node)} parameters")
    assert not offences, "\n".join(offences)
