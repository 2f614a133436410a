"""Training: the LightningModule, lever losses, callbacks and loggers (imports data and models only)."""

from ._audit import TrainingAudit
from ._augment import AugmentConfig, augment_command, augment_table
from ._callbacks import AtomicCheckpointIO, EpochCheckpoint, ExportWeights, GradientCheckpointing
from ._distill import DistillConfig, DistillLoss
from ._fairness import FairnessConfig, FairnessLoss, alignment_loss, ot_assignment
from ._module import DebiasModule, EmaConfig, OptimConfig
from ._preservation import PreservationConfig, PreservationFeatures
from ._tracking import (
    BatchMixMonitor,
    LearningRateLog,
    ProgressLog,
    SampleGrid,
    TensorBoardLogger,
    finish_wandb,
    image_grid,
    prepare_logger_config,
    redact,
    wandb_offline_reason,
)

__all__ = [
    "alignment_loss",
    "AtomicCheckpointIO",
    "augment_command",
    "augment_table",
    "AugmentConfig",
    "BatchMixMonitor",
    "DebiasModule",
    "DistillConfig",
    "DistillLoss",
    "EmaConfig",
    "EpochCheckpoint",
    "ExportWeights",
    "FairnessConfig",
    "FairnessLoss",
    "finish_wandb",
    "GradientCheckpointing",
    "image_grid",
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
