"""Attribute classifiers: lever 3's frozen training-time classifier, loaded from any module class and
safetensors weights, and the batched helpers every classifier and judge uses.

Images are float tensors ``(B, 3, H, W)`` in ``[0, 1]``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from fairtune.data import atomic_path


def _import_named(ref: str, *, what: str, expected: str):
    """The object ``pkg.mod:name`` (or ``pkg.mod.name``) names; nothing of it is called."""
    if not ref:
        raise ValueError(f"{what} is not set: give the import path of {expected}")
    module, _, name = ref.rpartition(":") if ":" in ref else ref.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"{what}={ref!r} cannot be imported: {exc}") from exc


def import_function(ref: str, *, what: str) -> Callable:
    """Import ``pkg.mod:function`` (or ``pkg.mod.function``): an extension point named in a config.

    Raises:
        ValueError: When it is not set, cannot be imported or is not callable (nothing is called).
    """
    fn = _import_named(ref, what=what, expected="a function ('module:function')")
    if not callable(fn):
        raise ValueError(f"{what}={ref!r} is not callable")
    return fn


def import_module_class(ref: str, *, what: str) -> type[nn.Module]:
    """Import ``pkg.mod.Class`` (or ``pkg.mod:Class``) and check it is a ``torch.nn.Module`` subclass.

    Raises:
        ValueError: When it cannot be imported or is not a module class (nothing is called).
    """
    cls = _import_named(ref, what=what, expected="a torch.nn.Module class")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{what}={ref!r} is not a torch.nn.Module subclass; only module classes are allowed")
    return cls


@dataclass
class ClassifierConfig:
    """The frozen, differentiable attribute classifier the fairness loss uses (never the judge).

    Attributes:
        module: Import path of a ``torch.nn.Module`` class.
        init_args: Its constructor arguments.
        weights: A safetensors file with its state dict; ``None`` only for a module that loads its own
            weights (``loads_own_weights = True``, e.g. ``fairtune.models.CLIPZeroShotClassifier``).
        input: ``pixels`` (images in [0, 1]) or ``latents`` (what the UNet denoises).
        temperature: Logits are divided by this before the softmax; > 1 keeps outputs soft.
    """

    module: str = ""
    init_args: dict = field(default_factory=dict)
    weights: str | None = None
    input: Literal["pixels", "latents"] = "pixels"
    temperature: float = 1.0


def load_classifier(cfg: ClassifierConfig, *, what: str = "classifier") -> nn.Module:
    """Instantiate ``cfg.module`` and load its safetensors weights (none for a module that loads its
    own, such as a CLIP classifier from its folder); frozen and in eval mode."""
    if not cfg.weights:
        cls = import_module_class(cfg.module, what=f"{what}.module")
        if not getattr(cls, "loads_own_weights", False):
            raise ValueError(f"{what}.weights is not set: give the classifier's safetensors file")
        return cls(**cfg.init_args).eval().requires_grad_(False)
    if not Path(cfg.weights).is_file():
        raise FileNotFoundError(f"{what}.weights={cfg.weights!r} does not exist")
    # Configs are code-equivalent (like LightningCLI's class_path), but the class must still be a
    # torch module: checked before anything is instantiated, and the weights are checked first.
    cls = import_module_class(cfg.module, what=f"{what}.module")
    model = cls(**cfg.init_args)
    try:
        state = load_file(cfg.weights)
    except Exception as exc:  # safetensors raises its own error type on a truncated file
        raise ValueError(f"{what}.weights={cfg.weights!r} is not a readable safetensors file: {exc}") from exc
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file through a temporary file and a rename (never half-written)."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def judged_labels(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    min_confidence: float = 0.0,
    n_classes: int | None = None,
    what: str = "classifier",
) -> torch.Tensor:
    """Class index per image from a judge's logits: the softmax (at ``temperature``) argmax, ``-1``
    (undetermined) where its probability is below ``min_confidence``. The one place judged labels are
    made (the comparison's panel, the training audit, CLIP's zero-shot and probe classifiers).

    Raises:
        ValueError: ``logits`` is not ``(batch, n_classes)``; the message names ``what``.
    """
    if logits.ndim != 2 or (n_classes is not None and logits.shape[1] != n_classes):
        want = f"(batch, {n_classes}) for its {n_classes} named classes" if n_classes else "(batch, classes)"
        raise ValueError(f"{what} returned logits of shape {tuple(logits.shape)}, expected {want}")
    conf, label = torch.softmax(logits.float() / temperature, dim=1).max(1)
    return torch.where(conf >= min_confidence, label, torch.full_like(label, -1))


@torch.no_grad()
def predict_batched(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Class predictions in batches."""
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def features_batched(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features in batches."""
    return torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
