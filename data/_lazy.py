"""Package facades that load their names on first use (PEP 562): a light command (``fairtune flag``,
``--help``) imports only the submodules it touches, never torch, Lightning or diffusers."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_facade(
    package: str, exports: dict[str, tuple[str, str]], namespace: dict
) -> tuple[Callable, Callable]:
    """The ``__getattr__`` and ``__dir__`` of a package whose public names live in submodules.

    Args:
        package: The package's ``__name__``.
        exports: Public name -> (relative submodule, attribute), e.g. ``{"Target": ("._schema", "Target")}``.
        namespace: The package's ``globals()``: a loaded name is cached there.
    """

    def __getattr__(name: str):
        try:
            module, attr = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module, package), attr)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
