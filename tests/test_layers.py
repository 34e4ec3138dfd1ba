"""The package's layers (docs/layout.md): a module imports only from its own layer or lower ones,
at the top of the file or inside a function, the modules import without a circle, and no module or
function outgrows the sizes the layout page states."""

import ast
import pathlib

SOURCE = pathlib.Path(__file__).resolve().parent.parent / "src" / "dtokd"

LAYERS = {
    # lowest first: a module may import from its layer and the layers before it
    "balancing": 0,
    "interrupts": 0,
    "models": 1,
    "losses": 2,
    "data": 2,
    "tasks": 3,
    "integrations": 3,
    "train": 4,
    "cli": 5,
    "bench": 5,
    "report": 5,
    "demo": 5,
    "profiling": 5,
    "__init__": 0,  # the root package: its version and the balancing API, imported lazily
    "__main__": 5,
}


def layer_of(dotted: str) -> int:
    """The layer of ``dtokd.<part>...``: its first part, a package or a top-level module."""
    part = dotted.split(".")[1] if dotted.count(".") else "__init__"
    if part not in LAYERS:
        raise AssertionError(f"{dotted}: the layer of {part!r} is not declared in LAYERS (and docs/layout.md)")
    return LAYERS[part]


def imports(path: pathlib.Path, type_checking: bool = True) -> list[tuple[int, str]]:
    """The ``dtokd`` modules ``path`` imports (line, dotted name), function-level ones included;
    ``from package import submodule`` names the submodule. ``type_checking=False`` leaves out the
    imports under ``if TYPE_CHECKING:``, which never run."""
    tree = ast.parse(path.read_text())
    skipped = set()
    if not type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped |= {id(inner) for part in node.body for inner in ast.walk(part)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dtokd"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                is_module = (SOURCE.parent / submodule.replace(".", "/")).with_suffix(".py").is_file()
                found.append((node.lineno, submodule if is_module else node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("dtokd")]
    return found


def modules():
    for path in sorted(SOURCE.rglob("*.py")):
        relative = path.relative_to(SOURCE.parent).with_suffix("")
        yield path, ".".join(relative.parts)


def test_every_layer_is_declared_and_no_module_imports_a_higher_layer():
    upward = []
    for path, name in modules():
        own = layer_of(name)
        for line, target in imports(path):
            if layer_of(target) > own:
                upward.append(f"{name}:{line} imports {target}")
    assert upward == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from dtokd.train.config import CHOICES\n")
    assert imports(bad) == [(2, "dtokd.train.config")]
    assert layer_of("dtokd.train.config") > layer_of("dtokd.data.bundle")


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports when it runs (a package as its ``__init__``), within dtokd."""
    names = {name for _, name in modules()}

    def resolve(target: str) -> str | None:
        while True:
            for candidate in (target, f"{target}.__init__"):
                if candidate in names:
                    return candidate
            if "." not in target:
                return None
            target = target.rsplit(".", 1)[0]

    return {
        name: {
            found for _, target in imports(path, type_checking=False) if (found := resolve(target)) not in (None, name)
        }
        for path, name in modules()
    }


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for following in graph[node]:
            if following not in index:
                visit(following)
                low[node] = min(low[node], low[following])
            elif following in stack:
                low[node] = min(low[node], index[following])
        if low[node] == index[node]:
            component = [stack.pop()]
            while component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_another_that_imports_it_back():
    assert circles(import_graph()) == []


def test_the_circle_check_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 60


def oversized(path) -> list[str]:
    """The module (over MAX_MODULE_LINES lines) and the functions (over MAX_FUNCTION_LINES,
    docstring included) in ``path`` that are too long, named with their sizes."""
    text = path.read_text()
    found = [f"{path.name}: {text.count(chr(10))} lines"] if text.count("\n") > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{path.name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_module_over_500_lines_and_no_function_over_60():
    assert [entry for path, _ in modules() for entry in oversized(path)] == []


def test_the_size_check_sees_a_long_function_and_a_long_module(tmp_path):
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * 60 + "\n" * 450)
    assert oversized(long) == ["long.py: 511 lines", "long.py:1 f: 61 lines"]
