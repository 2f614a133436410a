"""Lever 3's preservation term: what "stay close to the frozen base model" is measured on.

The fairness loss compares the adapter's output with the frozen model's output from the same noise
and prompt, in a feature space chosen by the recipe (DESIGN §4.3):

- ``latent``: the x0 estimates themselves, in the space the UNet denoises (cheap, any backbone);
- ``pixels``: the decoded images in [0, 1];
- ``clip``: CLIP image embeddings of the decoded images (a local CLIP folder or hub id; Shen et al.
  preserve CLIP and DINO features), compared by cosine distance by default;
- ``module``: any ``torch.nn.Module`` subclass (import path, constructor arguments, optional
  safetensors weights) that maps images in [0, 1] to features, e.g. ColoredDigits' ink map
  (stroke without colour) set in its configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from fairtune.models import import_module_class


@dataclass
class PreservationConfig:
    """Feature space of lever 3's preservation term.

    Attributes:
        features: ``latent``, ``pixels``, ``clip`` or ``module`` (see the module docstring).
        clip: ``clip`` only: the CLIP folder (``CLIPModel`` or ``CLIPVisionModelWithProjection``).
        module: ``module`` only: import path of a ``torch.nn.Module`` subclass taking images in [0, 1].
        init_args: ``module`` only: its constructor arguments.
        weights: ``module`` only: a safetensors state dict to load (``None``: none; e.g. a
            parameter-free feature map).
        distance: ``mse`` (mean squared difference) or ``cosine`` (1 − cosine similarity per image,
            features flattened); ``None``: ``cosine`` for ``clip``, ``mse`` otherwise.
    """

    features: Literal["latent", "pixels", "clip", "module"] = "latent"
    clip: str | None = None
    module: str | None = None
    init_args: dict = field(default_factory=dict)
    weights: str | None = None
    distance: Literal["mse", "cosine"] | None = None


class PreservationFeatures(nn.Module):
    """Frozen feature map of lever 3's preservation term; :meth:`loss` compares two outputs.

    Args:
        cfg: The feature space.

    Raises:
        ValueError: A setting the chosen ``features`` needs is missing or wrong.
    """

    def __init__(self, cfg: PreservationConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net: nn.Module | None = None
        if cfg.features == "clip":
            if not cfg.clip:
                raise ValueError("fairness.preservation.features='clip' needs fairness.preservation.clip")
            from fairtune.models import CLIPImageFeatures

            self.net = CLIPImageFeatures(cfg.clip)
        elif cfg.features == "module":
            if not cfg.module:
                raise ValueError(
                    "fairness.preservation.features='module' needs fairness.preservation.module "
                    "(import path of an nn.Module)"
                )
            cls = import_module_class(cfg.module, what="fairness.preservation.module")
            self.net = cls(**cfg.init_args)
            if cfg.weights:
                from safetensors.torch import load_file

                try:
                    self.net.load_state_dict(load_file(cfg.weights))
                except FileNotFoundError as exc:
                    raise FileNotFoundError(
                        f"fairness.preservation.weights={cfg.weights!r} does not exist"
                    ) from exc
            self.net.eval().requires_grad_(False)
        elif cfg.features not in ("latent", "pixels"):
            raise ValueError(
                f"fairness.preservation.features must be latent, pixels, clip or module, not {cfg.features!r}"
            )
        self.distance = cfg.distance or ("cosine" if cfg.features == "clip" else "mse")
        if self.distance not in ("mse", "cosine"):
            raise ValueError(f"fairness.preservation.distance must be mse or cosine, not {self.distance!r}")

    def train(self, mode: bool = True):
        return super().train(False)  # frozen

    def forward(self, x0: torch.Tensor, backbone) -> torch.Tensor:
        """Features of x0 estimates (UNet space) of ``backbone``."""
        if self.cfg.features == "latent":
            return x0
        pixels = backbone.to_pixels(x0)
        return pixels if self.net is None else self.net(pixels)

    def loss(self, feats: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Distance between the adapter's features and the frozen model's (``ref``, no gradient)."""
        if self.distance == "mse":
            return F.mse_loss(feats.float(), ref.float())
        return (1 - F.cosine_similarity(feats.flatten(1).float(), ref.flatten(1).float(), dim=1)).mean()
