"""LightningModules, callbacks and the ``fairtune`` CLI."""

from ._callbacks import ExportWeights
from ._module import DebiasModule, EmaConfig, OptimConfig

__all__ = ["DebiasModule", "EmaConfig", "ExportWeights", "OptimConfig"]
