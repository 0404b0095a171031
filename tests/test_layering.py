"""The layers of the design, checked on the source (an ``ast`` scan, nothing imported).

utils < core < (algorithms, reference) < diagnostics < training < (checkpoint, the ``gradhpo``
root) <
gradhpo_bench:
imports point down only, no import circle, no function-local ``gradhpo`` import inside
``gradhpo``, and ``gradhpo`` never imports ``gradhpo_bench``.
"""

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"

# (package prefix, layer); packages of one layer may not import each other.
LAYERS = (
    ("gradhpo.utils", 0),
    ("gradhpo.core", 1),
    ("gradhpo.algorithms", 2),
    ("gradhpo.reference", 2),
    ("gradhpo.diagnostics", 3),
    ("gradhpo.training", 4),
    ("gradhpo.checkpoint", 5),
    ("gradhpo", 5),
    ("gradhpo_bench", 6),
)


def modules():
    """``module name -> path`` for every module of both packages."""
    out = {}
    for package in ("gradhpo", "gradhpo_bench"):
        for path in sorted((SRC / package).rglob("*.py")):
            parts = list(path.relative_to(SRC).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def package_of(module):
    """The (prefix, layer) a module belongs to: the longest matching prefix."""
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if prefix == "gradhpo" and module != "gradhpo":
                continue  # only the root module itself; its subpackages are listed above
            return prefix, layer
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def imports(path, known):
    """``(imported module, line, at module level)`` for each gradhpo import in ``path``."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in known
                else node.module
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("gradhpo", "gradhpo_bench"):
                found.append((name, node.lineno, id(node) in top))
    return found


def test_imports_point_down_and_are_at_module_level():
    known = modules()
    problems = []
    for module, path in known.items():
        prefix, layer = package_of(module)
        for name, line, at_top in imports(path, known):
            where = f"{path.relative_to(SRC)}:{line} imports {name}"
            if module.startswith("gradhpo.") or module == "gradhpo":
                if name.startswith("gradhpo_bench"):
                    problems.append(f"{where}: gradhpo never imports gradhpo_bench")
                if not at_top:
                    problems.append(f"{where}: a function-local gradhpo import")
            their_prefix, their_layer = package_of(name)
            if their_layer > layer or (their_layer == layer and their_prefix != prefix):
                problems.append(
                    f"{where}: an upward or sideways import ({prefix} -> {their_prefix})"
                )
    assert not problems, "\n".join(problems)


def test_no_import_circle():
    known = modules()
    graph = {
        module: {name for name, _, _ in imports(path, known) if name in known and name != module}
        for module, path in known.items()
    }
    state = {}
    stack = []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_scan_sees_a_violation():
    # The checker itself: a module of core importing training is flagged.
    tree = ast.parse("def f():\n    from gradhpo.training import run\n")
    node = tree.body[0].body[0]
    assert isinstance(node, ast.ImportFrom) and id(node) not in set(map(id, tree.body))
    assert package_of("gradhpo.training.loop")[1] > package_of("gradhpo.core.base")[1]
