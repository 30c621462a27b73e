"""The package layout is the architecture (docs/architecture.md): each layer imports only layers below it, there
is no import cycle (also none hidden in a function-level import), and modules stay small."""

import ast
import os

import hf_control_ft

PACKAGE_DIR = os.path.dirname(hf_control_ft.__file__)
# lowest first; a module may import its own layer and the layers before it
LAYERS = ["utils", "core", "models", "rewards", "serialization", "feedback", "tasks", "processes", "trainers",
          "pipelines", "top"]
MAX_LINES = 400


def _modules():
    for root, _, names in os.walk(PACKAGE_DIR):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, PACKAGE_DIR)[:-3].replace(os.sep, ".")
                yield ("hf_control_ft" if rel == "__init__" else "hf_control_ft." + rel.removesuffix(".__init__")), path


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in LAYERS else "top"


def _imports(module: str, path: str) -> set[str]:
    """Every hf_control_ft module imported anywhere in the file (top level or inside functions)."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("hf_control_ft"):
                found.add(target)
                for alias in node.names:  # "from . import x" / "from .serialization import checkpoints"
                    found.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hf_control_ft"))
    known = dict(_modules())
    return {t for t in found if t in known and t != module}


def test_each_layer_imports_only_layers_below_it():
    violations = []
    for module, path in _modules():
        if module == "hf_control_ft":
            continue
        here = LAYERS.index(_layer(module))
        for target in _imports(module, path):
            if target == "hf_control_ft":
                violations.append(f"{module} imports the top-level package")
            elif LAYERS.index(_layer(target)) > here:
                violations.append(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})")
    assert not violations, "\n".join(violations)


def test_no_import_cycles_even_inside_functions():
    graph = {m: _imports(m, p) for m, p in _modules()}
    graph = {m: {t for t in deps if not m.startswith(t + ".")} for m, deps in graph.items()}  # parent packages
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in graph.get(m, ()):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)


def test_modules_stay_small():
    long = {m: n for m, p in _modules() if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_subpackages_declare_their_public_names():
    for module, path in _modules():
        if path.endswith("__init__.py") and module != "hf_control_ft":
            tree = ast.parse(open(path, encoding="utf-8").read())
            names = [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)]
            assert "__all__" in names, f"{module} has no __all__"
