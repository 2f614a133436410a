"""``fairtune fit``: LightningCLI over DebiasModule and AttributeDataModule, composable YAML configs."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import CheckpointIO

from fairtune.data import AttributeDataModule, atomic_write_text
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
# Config keys whose change does not change what a run computes: resuming with them changed is allowed
# (and recorded). Everything else must match the run folder's config.yaml.
NO_RESULT_KEYS = (
    "trainer.logger", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.log_every_n_steps", "trainer.callbacks", "trainer.devices", "trainer.num_nodes",
    "trainer.strategy", "trainer.default_root_dir", "trainer.profiler", "ckpt_path", "lr_monitor",
    "batch_mix", "samples", "allow_config_change", "config",
    "checkpoint.every_n_train_steps", "checkpoint.every_n_epochs", "checkpoint.train_time_interval",
    "checkpoint.keep_last",
    # it acts through data.image_size, which is compared (and it was recorded, unread, as 512 before)
    "model.backbone.resolution",
)  # fmt: skip


class ConfigError(ValueError):
    """A config that cannot run as asked (reported in one line by the ``fairtune`` command)."""


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_budget(cfg) -> None:
    """No run that trains nothing: ``max_steps`` or ``max_epochs`` of 0 (or below -1), or an epoch
    smaller than a batch."""
    steps = cfg.trainer.get("max_steps")
    if steps is not None and (steps == 0 or steps < -1):
        raise ConfigError(f"trainer.max_steps={steps}: a run needs at least one step (-1: no step limit)")
    epochs = cfg.trainer.get("max_epochs")
    if epochs is not None and (epochs == 0 or epochs < -1):
        raise ConfigError(f"trainer.max_epochs={epochs}: a run needs at least one epoch (-1: no epoch limit)")
    data = cfg.get("data") or {}
    per_epoch, batch = data.get("samples_per_epoch"), data.get("batch_size")
    if isinstance(per_epoch, int) and isinstance(batch, int) and per_epoch < batch:
        raise ConfigError(
            f"data.samples_per_epoch={per_epoch} is smaller than data.batch_size={batch}: an epoch would "
            "hold no full batch"
        )


def _apply_resolution(cfg) -> None:
    """``model.backbone.resolution`` (sd/sdxl; diffusers' ``--resolution``) is the training images' side:
    it sets ``data.image_size``, so ``config.yaml`` records the size the run trains at."""
    res = cfg.get("model.backbone.resolution")
    if res is None:
        return
    if cfg.get("model.backbone.kind") == "tiny":
        raise ConfigError(
            f"model.backbone.resolution={res} applies to sd and sdxl backbones; the tiny backbone trains at "
            "data.image_size (its UNet's sample_size)"
        )
    size = cfg.get("data.image_size")
    if size is None:
        cfg["data.image_size"] = res
    elif size != res:
        raise ConfigError(
            f"model.backbone.resolution={res} and data.image_size={size} disagree: both set the training "
            "images' side; give one of them (or the same value to both)"
        )


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
            atomic_write_text(path, text)
            hparams = yaml.safe_load(text) or {}
            for logger in trainer.loggers:
                if not isinstance(logger, CSVLogger):
                    logger.log_hyperparams(hparams)
        self.already_saved = trainer.strategy.broadcast(True)


class FairtuneCLI(LightningCLI):
    """LightningCLI with fairtune's defaults.

    - the run folder is ``trainer.default_root_dir``: it gets ``config.yaml`` (the resolved config),
      ``logs/version_N/metrics.csv`` (one version per launch, so a resume keeps the history),
      ``checkpoints/last.ckpt`` (written atomically every 100 optimizer steps and at every epoch end:
      ``--checkpoint.every_n_train_steps``, ``--checkpoint.every_n_epochs``,
      ``--checkpoint.train_time_interval``; any that fires saves, 0 turns one off) and the export;
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
        parser.add_argument(
            "--allow_config_change",
            type=bool,
            default=False,
            help="Resume a run folder whose last config differs in what changes the result (the change "
            "is recorded in config_changes.jsonl); without it such a resume is refused.",
        )
        parser.set_defaults(
            {
                # One file, overwritten (atomically) at each trigger: checkpoints/last.ckpt. The triggers
                # (every 100 steps and every epoch end by default) are EpochCheckpoint's own defaults.
                "checkpoint.filename": "last",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": False,
                "checkpoint.enable_version_counter": False,
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
        root = cfg.trainer.get("default_root_dir")
        if not root:  # the run folder holds the checkpoints a killed run resumes from: never a guess
            raise ConfigError(
                "trainer.default_root_dir is not set: name the run folder (config.yaml, checkpoints, "
                "adapter, logs), e.g. --trainer.default_root_dir runs/my-run"
            )
        _check_budget(cfg)
        _apply_resolution(cfg)
        if self.subcommand == "fit":
            self._check_resume(cfg, Path(root))
        cfg.trainer.logger = prepare_logger_config(cfg.trainer.get("logger"), root)

    def _check_resume(self, cfg, root: Path) -> None:
        """A run folder belongs to one config: resuming with one that changes the result is refused
        (naming the keys), unless ``--allow_config_change``; every change is recorded."""
        old_path, ckpt = root / "config.yaml", root / "checkpoints" / "last.ckpt"
        if cfg.get("ckpt_path") != "last" or not ckpt.is_file() or not old_path.is_file():
            return
        parser = self._subcommand_parsers[self.subcommand]
        new = _flatten(yaml.safe_load(redact(parser.dump(cfg, skip_none=False))) or {})
        old = _flatten(yaml.safe_load(old_path.read_text()) or {})
        changed = {
            k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
        }
        if not changed:
            return
        result = {k: v for k, v in changed.items() if not k.startswith(NO_RESULT_KEYS)}
        if result and not cfg.get("allow_config_change"):
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(result.items())[:8])
            more = f" (and {len(result) - 8} more)" if len(result) > 8 else ""
            raise ConfigError(
                f"{root} holds a run trained with another config; changed: {shown}{more}. Use a new run "
                "folder (--trainer.default_root_dir DIR), or resume anyway with --allow_config_change true"
            )
        if int(os.environ.get("RANK", "0")) == 0:
            record = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "changed": changed,
                "affects_result": sorted(result),
            }
            with open(root / "config_changes.jsonl", "a") as f:
                f.write(json.dumps(record, default=str) + "\n")

    def after_fit(self) -> None:
        finish_wandb(self.trainer)

    def _instantiate_trainer(self, config, callbacks):
        root = config["default_root_dir"]  # set: checked in before_instantiate_classes
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
