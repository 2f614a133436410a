"""LightningModules, callbacks and the ``fairtune`` CLI."""

from ._audit import TrainingAudit
from ._callbacks import ExportWeights
from ._fairness import (
    ClassifierConfig,
    FairnessConfig,
    FairnessLoss,
    alignment_loss,
    load_classifier,
    ot_assignment,
)
from ._module import DebiasModule, EmaConfig, OptimConfig

__all__ = [
    "ClassifierConfig",
    "DebiasModule",
    "EmaConfig",
    "ExportWeights",
    "FairnessConfig",
    "FairnessLoss",
    "OptimConfig",
    "TrainingAudit",
    "alignment_loss",
    "load_classifier",
    "ot_assignment",
]
