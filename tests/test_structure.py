"""The project's shape: command-line scripts on top of the library, never the reverse, no import circles,
and nothing of ours installed into site-packages."""

import ast
import os
import subprocess
import sys

from conftest import REPO

SCRIPTS = {"prepare", "train", "sample", "export", "eval", "explain", "plot"}


def imports_between_modules():
    """{module: the top-level modules of this project it imports}, for every top-level .py file."""
    modules = {f[:-3] for f in os.listdir(REPO) if f.endswith(".py")}
    graph = {}
    for name in modules:
        tree = ast.parse(open(os.path.join(REPO, name + ".py"), encoding="utf-8").read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = found & modules - {name}
    return graph


def test_no_library_module_imports_a_script():
    graph = imports_between_modules()
    wrong = {m: sorted(deps & SCRIPTS) for m, deps in graph.items() if m not in SCRIPTS and deps & SCRIPTS}
    assert wrong == {}


def test_no_import_circle():
    graph = imports_between_modules()

    def reaches(start, target, seen):
        for dep in graph[start] - seen:
            if dep == target or reaches(dep, target, seen | {dep}):
                return True
        return False

    assert [m for m in sorted(graph) if reaches(m, m, set())] == []


def test_installing_the_project_puts_no_module_of_ours_in_site_packages(tmp_path):
    """`pip install -e .` must not register model, config, data, ... as importable top-level modules: other
    projects in the same environment have modules of those names."""
    names = sorted(f[:-3] for f in os.listdir(REPO) if f.endswith(".py"))
    probe = "import importlib.util, sys; print([n for n in sys.argv[1:] if importlib.util.find_spec(n)])"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", probe, *names], cwd=tmp_path, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importable outside the checkout: {result.stdout}"
