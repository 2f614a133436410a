"""Training: the LightningModule, lever losses, callbacks and loggers (imports data and models only).

Names load on first use (``fairtune.data.lazy_facade``).
"""

from __future__ import annotations

from fairtune.data import lazy_facade

# name -> (submodule, attribute): the public facade
_EXPORTS = {
    "TrainingAudit": ("._audit", "TrainingAudit"),
    "AugmentConfig": ("._augment", "AugmentConfig"),
    "augment_table": ("._augment", "augment_table"),
    "AtomicCheckpointIO": ("._callbacks", "AtomicCheckpointIO"),
    "EpochCheckpoint": ("._callbacks", "EpochCheckpoint"),
    "ExportWeights": ("._callbacks", "ExportWeights"),
    "GradientCheckpointing": ("._callbacks", "GradientCheckpointing"),
    "DistillConfig": ("._distill", "DistillConfig"),
    "DistillFeedback": ("._distill", "DistillFeedback"),
    "DistillLoss": ("._distill", "DistillLoss"),
    "FairnessConfig": ("._fairness", "FairnessConfig"),
    "FairnessLoss": ("._fairness", "FairnessLoss"),
    "alignment_loss": ("._fairness", "alignment_loss"),
    "ot_assignment": ("._fairness", "ot_assignment"),
    "DebiasModule": ("._module", "DebiasModule"),
    "EmaConfig": ("._module", "EmaConfig"),
    "OptimConfig": ("._module", "OptimConfig"),
    "PreservationConfig": ("._preservation", "PreservationConfig"),
    "PreservationFeatures": ("._preservation", "PreservationFeatures"),
    "BatchMixMonitor": ("._monitors", "BatchMixMonitor"),
    "LearningRateLog": ("._monitors", "LearningRateLog"),
    "ProgressLog": ("._monitors", "ProgressLog"),
    "SampleGrid": ("._monitors", "SampleGrid"),
    "TensorBoardLogger": ("._loggers", "TensorBoardLogger"),
    "finish_wandb": ("._loggers", "finish_wandb"),
    "prepare_logger_config": ("._loggers", "prepare_logger_config"),
    "redact": ("._loggers", "redact"),
    "wandb_offline_reason": ("._loggers", "wandb_offline_reason"),
}

__all__ = [
    "alignment_loss",
    "AtomicCheckpointIO",
    "augment_table",
    "AugmentConfig",
    "BatchMixMonitor",
    "DebiasModule",
    "DistillConfig",
    "DistillFeedback",
    "DistillLoss",
    "EmaConfig",
    "EpochCheckpoint",
    "ExportWeights",
    "FairnessConfig",
    "FairnessLoss",
    "finish_wandb",
    "GradientCheckpointing",
    "LearningRateLog",
    "OptimConfig",
    "ot_assignment",
    "prepare_logger_config",
    "PreservationConfig",
    "PreservationFeatures",
    "ProgressLog",
    "redact",
    "SampleGrid",
    "TensorBoardLogger",
    "TrainingAudit",
    "wandb_offline_reason",
]

__getattr__, __dir__ = lazy_facade(__name__, _EXPORTS, globals())
