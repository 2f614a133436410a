"""Training: the LightningModule, lever losses, callbacks and loggers (imports data and models only)."""

from ._callbacks import AtomicCheckpointIO, EpochCheckpoint, ExportWeights, GradientCheckpointing
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
    "AtomicCheckpointIO",
    "EpochCheckpoint",
    "finish_wandb",
    "BatchMixMonitor",
    "GradientCheckpointing",
    "LearningRateLog",
    "SampleGrid",
    "TensorBoardLogger",
    "image_grid",
    "prepare_logger_config",
    "redact",
    "wandb_offline_reason",
    "DebiasModule",
    "EmaConfig",
    "ExportWeights",
    "ProgressLog",
    "FairnessConfig",
    "FairnessLoss",
    "OptimConfig",
    "PreservationConfig",
    "PreservationFeatures",
    "alignment_loss",
    "ot_assignment",
]
