"""Experiment tracking's loggers (DESIGN §9): loggers from config, wandb offline without a key, and
secrets kept out of every config, log and report.

Loggers are chosen with ``--trainer.logger`` (``configs/launch/wandb.yaml``, ``tensorboard.yaml``); the
CSV log (``DIR/logs/version_N/metrics.csv``) is always kept beside them. A logger left without a
``save_dir`` writes into the run folder. A wandb logger runs offline unless ``WANDB_API_KEY`` is set (or
``WANDB_MODE=online`` is set explicitly, for a ``wandb login`` in ``~/.netrc``): no network is tried, and
the run stays under ``DIR/wandb/offline-run-*`` for a later ``wandb sync``.
"""

from __future__ import annotations

import os
import re
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger as _TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

WANDB_LOGGERS = ("lightning.pytorch.loggers.WandbLogger", "lightning.pytorch.loggers.wandb.WandbLogger")

# Environment variables whose values are secrets: never written to a config, log or report.
_SECRET_NAME = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD)$", re.IGNORECASE)


class TensorBoardLogger(_TensorBoardLogger):
    """Lightning's TensorBoardLogger with ``save_dir`` optional: left out, it is the run folder
    (``trainer.default_root_dir``), so ``configs/launch/tensorboard.yaml`` composes with any run.

    Args:
        save_dir: Folder of the event files; ``None``: the run folder (filled in by ``fairtune fit``).
        name: Sub-folder under ``save_dir``.
        **kwargs: Any other argument of ``lightning.pytorch.loggers.TensorBoardLogger``.
    """

    def __init__(self, save_dir: str | None = None, name: str | None = "tensorboard", **kwargs: Any) -> None:
        super().__init__(save_dir if save_dir is not None else ".", name=name, **kwargs)


# --------------------------------------------------------------------------------------------- secrets
def secret_values(min_length: int = 8) -> list[str]:
    """Values of the environment's secret-looking variables (``*_API_KEY``, ``*TOKEN``, ...)."""
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and v and len(v) >= min_length]


def redact(text: str) -> str:
    """``text`` with every secret value from the environment replaced by ``***``."""
    for value in secret_values():
        text = text.replace(value, "***")
    return text


# --------------------------------------------------------------------------------------------- loggers
def wandb_offline_reason() -> str | None:
    """Why a wandb logger must run offline (``None``: online is allowed).

    Online only with ``WANDB_API_KEY`` set, or ``WANDB_MODE=online`` set explicitly; an explicit
    ``WANDB_MODE`` of ``offline``/``dryrun``/``disabled`` is kept as it is.
    """
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "dryrun", "disabled"):
        return f"WANDB_MODE={mode}"
    if mode == "online":
        return None
    if not os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY is not set"
    return None


def _class_path(node: Any) -> str | None:
    return getattr(node, "class_path", None) if node is not None else None


def _is_wandb(class_path: str | None) -> bool:
    if class_path is None:
        return False
    if class_path in WANDB_LOGGERS:
        return True
    try:
        from jsonargparse import import_object
        from lightning.pytorch.loggers import WandbLogger

        cls = import_object(class_path)
        return isinstance(cls, type) and issubclass(cls, WandbLogger)
    except Exception:
        return False


def prepare_logger_config(logger: Any, root: str) -> Any:
    """Fill in the logger section of a parsed (not yet instantiated) trainer config, in place.

    - a logger with a ``save_dir`` left out (``None``, or wandb's default ``.``) writes into ``root``;
    - a wandb logger runs offline when :func:`wandb_offline_reason` says so (no network is tried), and
      never uploads checkpoints unless ``log_model`` was asked for with a key.

    Args:
        logger: ``trainer.logger`` as parsed: ``None``/bool, a ``class_path``/``init_args`` namespace
            or a list of them.
        root: The run folder.
    """
    nodes = logger if isinstance(logger, list) else [logger]
    for node in nodes:
        init = getattr(node, "init_args", None)
        if init is None:
            continue
        if "save_dir" in init and init.save_dir in (None, "."):
            init.save_dir = root
        if _is_wandb(_class_path(node)):
            if init.get("dir") is None and init.save_dir in (None, "."):
                init.save_dir = root
            reason = wandb_offline_reason()
            if reason is not None and not init.get("offline"):
                init.offline = True
                if init.get("mode") not in (None, "offline", "disabled"):
                    init.mode = "offline"
                # no crash reports either: offline means no network at all
                os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
                rank_zero_info(
                    f"wandb: logging offline ({reason}); the run is kept under {root}/wandb/ "
                    "for a later `wandb sync`"
                )
            if init.get("offline"):
                init.log_model = False
    return logger


def finish_wandb(trainer) -> None:
    """End the wandb run of a finished fit (rank zero), so its files are complete on disk (offline:
    ready for ``wandb sync``) and a later fit in the same process starts a new run."""
    from lightning.pytorch.loggers import WandbLogger

    if trainer is None or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()
