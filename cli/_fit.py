"""``fairtune fit``: LightningCLI over DebiasModule and AttributeDataModule, composable YAML configs."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import CheckpointIO

from fairtune.data import AttributeDataModule
from fairtune.train import (
    AtomicCheckpointIO,
    BatchMixMonitor,
    DebiasModule,
    EpochCheckpoint,
    ExportWeights,
    GradientCheckpointing,
    LearningRateLog,
    SampleGrid,
    finish_wandb,
    prepare_logger_config,
    redact,
)

PEAK_RSS = "[fit] peak RSS"


class RunConfigCallback(SaveConfigCallback):
    """Writes the resolved config to the run folder itself (``DIR/config.yaml``), from rank zero, and
    hands it to the loggers other than CSV (wandb's run config, TensorBoard's hparams).

    Secrets never reach the file or the loggers: the value of any secret-looking environment variable
    (``WANDB_API_KEY``, ``*_TOKEN``, ...) is replaced by ``***`` wherever it would appear.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            text = redact(self.parser.dump(self.config, skip_none=False))
            path = root / self.config_filename
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
            hparams = yaml.safe_load(text) or {}
            for logger in trainer.loggers:
                if not isinstance(logger, CSVLogger):
                    logger.log_hyperparams(hparams)
        self.already_saved = trainer.strategy.broadcast(True)


class FairtuneCLI(LightningCLI):
    """LightningCLI with fairtune's defaults.

    - the run folder is ``trainer.default_root_dir``: it gets ``config.yaml`` (the resolved config),
      ``logs/version_N/metrics.csv`` (one version per launch, so a resume keeps the history),
      ``checkpoints/last.ckpt`` (written atomically at every epoch end) and the export;
    - ``ckpt_path`` defaults to ``last``: the same command started again resumes a killed run;
    - the sampler deals its own draw to DDP ranks, so Lightning does not wrap it;
    - ``--trainer.logger`` adds loggers (wandb, TensorBoard) beside the CSV log; one left without a
      ``save_dir`` writes into the run folder, and wandb runs offline without ``WANDB_API_KEY``;
    - tracking callbacks: ``lr_monitor`` (learning rates), ``batch_mix`` (each batch's attribute mix
      against the target), ``samples`` (a grid of samples every k steps; off by default);
    - ``gradient_checkpointing.enabled`` trades compute for activation memory on large UNets.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(EpochCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ExportWeights, "export")
        parser.add_lightning_class_args(LearningRateLog, "lr_monitor")
        parser.add_lightning_class_args(BatchMixMonitor, "batch_mix")
        parser.add_lightning_class_args(SampleGrid, "samples")
        parser.add_lightning_class_args(GradientCheckpointing, "gradient_checkpointing")
        parser.set_defaults(
            {
                # One file, overwritten at every epoch end (atomically): checkpoints/last.ckpt.
                "checkpoint.filename": "last",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": False,
                "checkpoint.enable_version_counter": False,
                "checkpoint.every_n_epochs": 1,
                "trainer.use_distributed_sampler": False,
            }
        )

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            # Started again, the same command resumes from checkpoints/last.ckpt (none: a fresh start).
            parser.set_defaults({"ckpt_path": "last"})
        return parser

    def _run_config(self):
        return self.config.get(self.subcommand) if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._run_config()
        root = cfg.trainer.get("default_root_dir") or "runs/fit"
        cfg.trainer.logger = prepare_logger_config(cfg.trainer.get("logger"), root)

    def after_fit(self) -> None:
        finish_wandb(self.trainer)

    def _instantiate_trainer(self, config, callbacks):
        root = config.get("default_root_dir") or "runs/fit"
        config["default_root_dir"] = root
        logger = config.get("logger")
        if logger in (None, True):
            config["logger"] = CSVLogger(save_dir=root, name="logs")
        elif logger is not False:
            # Other loggers come in addition to the CSV log, which tools and the README rely on.
            loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger]
            if not any(isinstance(lg, CSVLogger) for lg in loggers):
                loggers.insert(0, CSVLogger(save_dir=root, name="logs"))
            config["logger"] = loggers
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        for cb in callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = f"{root}/checkpoints"
        return super()._instantiate_trainer(config, callbacks)


def run_fit_cli(args: list[str] | None) -> None:
    FairtuneCLI(
        DebiasModule,
        AttributeDataModule,
        args=args,
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "fairtune"},
    )
    # The peak memory of this process, for the sweep's and the benchmarks' tables.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{PEAK_RSS} {peak_mb:.0f} MB", file=sys.stderr, flush=True)
