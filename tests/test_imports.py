"""The files stand in layers and import only downwards: no cycle, and a command line is imported by
no file (a library that others need lives in a module of its own)."""
import ast
import glob
import os

from test_train import ROOT

# low to high: a module may import only those before it; the command lines last, imported by none
LAYERS = ["configurator", "model", "memory", "lora", "data", "metaicl", "checkpoints", "inference", "suite"]
COMMAND_LINES = ["train", "eval", "bench", "sample"]


def project_imports(path):
    """The project's modules a file imports, wherever it imports them (in functions too)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(LAYERS + COMMAND_LINES)


def test_every_module_has_a_layer():
    found = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert found == set(LAYERS + COMMAND_LINES)


def test_imports_only_go_down():
    for i, name in enumerate(LAYERS):
        above = project_imports(os.path.join(ROOT, name + ".py")) - set(LAYERS[:i])
        assert not above, f"{name}.py imports {sorted(above)}, which stand above it"
    for name in COMMAND_LINES:
        assert not project_imports(os.path.join(ROOT, name + ".py")) & set(COMMAND_LINES), name


def test_no_file_imports_sample():
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "config", "*.py")) + \
        glob.glob(os.path.join(ROOT, "tests", "*.py"))
    assert len(files) > 20
    assert [os.path.relpath(f, ROOT) for f in files if "sample" in project_imports(f)] == []
