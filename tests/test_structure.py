"""The project's shape: the commands at the top import the library (model.py and the nanoforge package), never
the reverse; no import circles; nothing at the top but commands and model.py; nothing of ours in site-packages."""

import ast
import os
import subprocess
import sys

from conftest import REPO

COMMANDS = {"prepare", "train", "sample", "export", "eval", "explain", "plot", "serve", "scaling", "rl",
            "features"}


def module_files():
    """{dotted module name: path} for the top-level files and the nanoforge package."""
    found = {f[:-3]: os.path.join(REPO, f) for f in os.listdir(REPO) if f.endswith(".py")}
    package = os.path.join(REPO, "nanoforge")
    for f in os.listdir(package):
        if f.endswith(".py") and f != "__init__.py":
            found["nanoforge." + f[:-3]] = os.path.join(package, f)
    return found


def imports_between_modules():
    """{module: the modules of this project it imports}."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}  # from nanoforge import x
        graph[name] = found & set(files) - {name}
    return graph


def test_the_top_holds_the_commands_and_model_py_only():
    assert set(module_files()) - {m for m in module_files() if m.startswith("nanoforge.")} == COMMANDS | {"model"}


def test_no_library_module_imports_a_command():
    graph = imports_between_modules()
    wrong = {m: sorted(deps & COMMANDS) for m, deps in graph.items() if m not in COMMANDS and deps & COMMANDS}
    assert wrong == {}
    assert graph["model"] == set(), "model.py imports only torch"


def test_no_import_circle():
    graph = imports_between_modules()

    def reaches(start, target, seen):
        for dep in graph[start] - seen:
            if dep == target or reaches(dep, target, seen | {dep}):
                return True
        return False

    assert [m for m in sorted(graph) if reaches(m, m, set())] == []


def test_installing_the_project_puts_no_module_of_ours_in_site_packages(tmp_path):
    """`pip install -e .` installs the dependencies only: the project runs from its checkout, as nanoGPT does.
    model, train, prepare, ... are common names that other projects' modules have."""
    names = sorted(m for m in module_files() if "." not in m) + ["nanoforge"]
    probe = "import importlib.util, sys; print([n for n in sys.argv[1:] if importlib.util.find_spec(n)])"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", probe, *names], cwd=tmp_path, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importable outside the checkout: {result.stdout}"


def test_no_bench_imports_a_command():
    """A bench imports what a user's code would import: the library, never a command's insides."""
    bench = os.path.join(REPO, "bench")
    wrong = {}
    for f in sorted(os.listdir(bench)):
        if not f.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(bench, f), encoding="utf-8").read())
        found = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        found |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        if found & COMMANDS:
            wrong[f] = sorted(found & COMMANDS)
    assert wrong == {}
