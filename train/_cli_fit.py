"""``fairtune fit``: LightningCLI over DebiasModule and AttributeDataModule, composable YAML configs."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import CheckpointIO

from fairtune.data import AttributeDataModule

from ._callbacks import AtomicCheckpointIO, EpochCheckpoint, ExportWeights
from ._module import DebiasModule


class RunConfigCallback(SaveConfigCallback):
    """Writes the resolved config to the run folder itself (``DIR/config.yaml``), from rank zero."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            self.parser.save(
                self.config, str(root / self.config_filename), skip_none=False, overwrite=True,
                multifile=self.multifile,
            )  # fmt: skip
        self.already_saved = trainer.strategy.broadcast(True)


class FairtuneCLI(LightningCLI):
    """LightningCLI with fairtune's defaults.

    - the run folder is ``trainer.default_root_dir``: it gets ``config.yaml`` (the resolved config),
      ``logs/version_N/metrics.csv`` (one version per launch, so a resume keeps the history),
      ``checkpoints/last.ckpt`` (written atomically at every epoch end) and the export;
    - ``ckpt_path`` defaults to ``last``: the same command started again resumes a killed run;
    - the sampler deals its own draw to DDP ranks, so Lightning does not wrap it.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(EpochCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ExportWeights, "export")
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

    def _instantiate_trainer(self, config, callbacks):
        root = config.get("default_root_dir") or "runs/fit"
        config["default_root_dir"] = root
        if config.get("logger") in (None, True):
            config["logger"] = CSVLogger(save_dir=root, name="logs")
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
