"""The package's layout keeps the architecture visible: read from the source, nothing imported.

No module imports another's private name (a private name is that module's own
business); spotguard's modules import one another without a cycle (module-level
imports: a lazy import inside a function may point back up); and the verbs of
the command line are one module each in spotguard/commands, named by its
registry, reached only from cli.py, and importing no other verb.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Iterator

PACKAGE = Path(__file__).resolve().parent.parent / "spotguard"
COMMANDS = "spotguard.commands"
SHARED_BY_VERBS = {"__init__", "common"}  # the modules of spotguard/commands that are not a verb


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package by dotted name → (its file, whether it is a package's __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = modules()


def imports(tree: ast.AST, *, module_level: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of a module; with `module_level`, those outside any function body."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def source_of(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of the module a `from … import` reads from."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported(module: str, *, module_level: bool) -> Iterator[tuple[str, str | None, int]]:
    """(module read from, name taken from it or None for a plain `import`, line) for each import of `module`."""
    path, is_package = MODULES[module]
    for node in imports(ast.parse(path.read_text(), str(path)), module_level=module_level):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        else:
            source = source_of(module, is_package, node)
            for alias in node.names:
                yield source, alias.name, node.lineno


def depends_on(module: str, *, module_level: bool) -> set[str]:
    """The package's modules that `module` imports (a `from pkg import sub` counts as pkg.sub)."""
    found = set()
    for source, name, _ in imported(module, module_level=module_level):
        if name is not None and f"{source}.{name}" in MODULES:
            found.add(f"{source}.{name}")
        elif source in MODULES:
            found.add(source)
    return found - {module}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per back edge found by a depth-first walk: empty when the graph has no cycle."""
    found, state = [], {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    return found


def verb_modules() -> set[str]:
    return {name.rsplit(".", 1)[1] for name in MODULES
            if name.startswith(COMMANDS + ".") and name.rsplit(".", 1)[1] not in SHARED_BY_VERBS}


# ---------------------------------------------------------------------- the tests


def test_the_walk_sees_the_package():
    assert {"spotguard.cli", "spotguard.machine", "spotguard.commands", "spotguard.commands.check"} <= MODULES.keys()
    assert "spotguard.machine" in depends_on("spotguard.store", module_level=True)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_modules_private_name():
    found = []
    for module in MODULES:
        for source, name, line in imported(module, module_level=False):
            taken = [name] if name is not None else source.split(".")
            if any(is_private(part) for part in taken) or is_private(source.rsplit(".", 1)[-1]):
                found.append(f"{MODULES[module][0].relative_to(PACKAGE.parent)}:{line}: {source} {name or ''}")
    assert found == [], "private names imported:\n" + "\n".join(found)


def test_the_modules_import_one_another_without_a_cycle():
    graph = {module: depends_on(module, module_level=True) for module in MODULES}
    assert cycles(graph) == []


def test_the_registry_and_the_commands_directory_list_the_same_verbs():
    from spotguard import commands  # the registry alone: it imports no verb

    assert {verb.module for verb in commands.VERBS.values()} == verb_modules()
    assert len({verb.module for verb in commands.VERBS.values()}) == len(commands.VERBS)
    for name in verb_modules():
        path, _ = MODULES[f"{COMMANDS}.{name}"]
        defined = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert {"add_arguments", "run"} <= defined, f"{path.name} lacks add_arguments or run"


def test_verbs_are_reached_only_from_the_command_line_and_never_from_one_another():
    verbs = {f"{COMMANDS}.{name}" for name in verb_modules()}
    for module in MODULES:
        reached = depends_on(module, module_level=False)
        if not module.startswith(COMMANDS) and module != "spotguard.cli":
            assert not {m for m in reached if m == COMMANDS or m.startswith(COMMANDS + ".")}, module
        if module in verbs:
            assert not (reached & verbs), f"{module} imports another verb: {reached & verbs}"


def test_the_command_line_imports_only_the_chosen_verb():
    # check-config runs before anything is set up: no AWS library, no other verb; --help imports no verb at all.
    probe = (
        "import sys; from spotguard.cli import main\n"
        "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code\n"
        "verbs = sorted(m for m in sys.modules if m.startswith('spotguard.commands.') "
        "and m != 'spotguard.commands.common')\n"
        "aws = sorted(m for m in ('aiobotocore', 'botocore', 'boto3') if m in sys.modules)\n"
        "print(code, verbs, aws, file=sys.stderr)"
    )
    example = str(PACKAGE.parent / "config.example.toml")
    for argv, expected in ((["check-config", "--config", example], "0 ['spotguard.commands.check_config'] []"),
                           (["--help"], "0 [] []")):
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)
        assert done.stderr.splitlines()[-1] == expected, done.stderr


def test_the_version_has_one_source():
    """pyproject takes it from spotguard.__version__; the installed metadata says the same."""
    import importlib.metadata
    import tomllib

    import spotguard

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert importlib.metadata.version("spotguard") == spotguard.__version__
