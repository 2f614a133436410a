import importlib
import pkgutil

import pytest

PACKAGES = ["fairtune.data", "fairtune.models", "fairtune.train", "fairtune.eval"]


def _modules():
    for name in PACKAGES:
        pkg = importlib.import_module(name)
        yield name
        for info in pkgutil.iter_modules(pkg.__path__):
            yield f"{name}.{info.name}"


@pytest.mark.parametrize("module", list(_modules()))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_public_names_resolve():
    for name in PACKAGES:
        pkg = importlib.import_module(name)
        for attr in getattr(pkg, "__all__", []):
            assert hasattr(pkg, attr), f"{name}.{attr}"
