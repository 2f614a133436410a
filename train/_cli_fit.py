"""``fairtune fit``: LightningCLI over DebiasModule and AttributeDataModule, composable YAML configs."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from fairtune.data import AttributeDataModule

from ._callbacks import AtomicCheckpointIO, ExportWeights
from ._module import DebiasModule


class FairtuneCLI(LightningCLI):
    """LightningCLI with fairtune's defaults.

    - the run folder is ``trainer.default_root_dir``: it gets ``config.yaml`` (the resolved config),
      ``metrics.csv``, ``checkpoints/last.ckpt`` (written at every epoch end) and the export;
    - ``ckpt_path`` defaults to ``last``: the same command started again resumes a killed run;
    - the sampler deals its own draw to DDP ranks, so Lightning does not wrap it.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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
        if "ckpt_path" in parser.get_defaults():
            parser.set_defaults({"ckpt_path": "last"})

    def _instantiate_trainer(self, config, callbacks):
        root = config.get("default_root_dir") or "runs/fit"
        config["default_root_dir"] = root
        if config.get("logger") in (None, True):
            config["logger"] = CSVLogger(save_dir=root, name="", version="")
        if not config.get("plugins"):
            config["plugins"] = [AtomicCheckpointIO()]
        for cb in callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = f"{root}/checkpoints"
        return super()._instantiate_trainer(config, callbacks)


def run_fit_cli(args: list[str] | None) -> None:
    FairtuneCLI(
        DebiasModule,
        AttributeDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "fairtune"},
    )
