import importlib
import pkgutil

import pytest

PACKAGES = ["fairtune.data", "fairtune.models", "fairtune.train", "fairtune.eval", "fairtune.cli"]


def _modules():
    for name in PACKAGES:
        pkg = importlib.import_module(name)
        yield name
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name != "__main__":  # running it is running the command
                yield f"{name}.{info.name}"


@pytest.mark.parametrize("module", list(_modules()))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_public_names_resolve():
    for name in PACKAGES:
        pkg = importlib.import_module(name)
        for attr in getattr(pkg, "__all__", []):
            assert hasattr(pkg, attr), f"{name}.{attr}"


# The layout's one direction of imports (docs/design.md): data -> models -> {train, eval} -> cli.
ALLOWED = {
    "data": set(),
    "models": {"data"},
    "train": {"data", "models"},
    "eval": {"data", "models"},
    "cli": {"data", "models", "train", "eval", "configs"},
}


def _fairtune_imports(path):
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            if n.startswith("fairtune."):
                yield n


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_flow_one_way_and_stay_public(folder):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for path in sorted((root / folder).glob("*.py")):
        for name in _fairtune_imports(path):
            parts = name.split(".")
            assert parts[1] in ALLOWED[folder] | {folder}, f"{path.name} imports {name}"
            private = [p for p in parts[2:] if p.startswith("_")]
            assert parts[1] == folder or not private, f"{path.name} imports a private module: {name}"
        assert len(path.read_text().splitlines()) <= 600, f"{folder}/{path.name} is over 600 lines"
