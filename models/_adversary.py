"""Lever 2: an adversarial attribute head on the UNet's mid-block (h-space) features (DESIGN §4.2).

A small head predicts the protected attribute (group) of the training image from the pooled output
of ``unet.mid_block``, captured by a forward hook that works on any ``UNet2DConditionModel``. The LoRA
is pushed to remove that signal in one of two ways:

- ``confusion`` (default, bounded): the head minimises its cross-entropy on detached features; the
  LoRA minimises ``λ · KL(q || head(features))``, pulling the head's prediction toward the target
  mix ``q`` through a head whose weights it cannot change. Bounded below by 0.
- ``reversal``: gradient reversal (Ganin & Lempitsky; Zhang et al., 2018): the head minimises its
  cross-entropy and the LoRA receives −λ times the gradient. Unbounded: it diverged in a trial here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call


@dataclass
class AdversaryConfig:
    """The adversarial attribute head (lever 2).

    Attributes:
        weight: λ after warm-up.
        warmup_steps: λ ramps linearly from 0 to ``weight`` over these steps, so the head can learn
            to read the attribute before the LoRA is asked to hide it.
        loss: ``confusion`` (bounded, default) or ``reversal`` (plain gradient reversal).
        features: ``conditional``: mid-block features of the conditional pass; ``prompt_induced``:
            conditional minus unconditional features (one extra pass through down and mid blocks).
        timesteps: ``[lo, hi)``: only training examples whose timestep lies here train or push the head.
        hidden: Hidden width of the head.
        lr: Learning rate of the head (its own AdamW param group).
    """

    weight: float = 0.5
    warmup_steps: int = 100
    loss: Literal["confusion", "reversal"] = "confusion"
    features: Literal["conditional", "prompt_induced"] = "conditional"
    timesteps: tuple[int, int] = (0, 1000)
    hidden: int = 128
    lr: float = 1e-3

    def lam(self, step: int) -> float:
        """λ at an optimizer step."""
        if self.warmup_steps <= 0:
            return self.weight
        return self.weight * min(1.0, step / self.warmup_steps)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-lam`` on the way back."""
    return _GradReverse.apply(x, lam)


class _StopForward(Exception):
    pass


class MidBlockFeatures:
    """Captures ``unet.mid_block``'s output (pooled over space to ``(B, C)``) with a forward hook.

    ``stop_after`` makes the next forward pass end right after the mid block (the up blocks are not
    needed for features): :meth:`run_until_mid` uses it for the unconditional pass.
    """

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.value: torch.Tensor | None = None
        self._stop = False
        self.handle = unet.mid_block.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.value = output.float().mean(dim=(2, 3))
        if self._stop:
            raise _StopForward

    def pop(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("no mid-block features captured: was the UNet called?")
        v, self.value = self.value, None
        return v

    def run_until_mid(self, *args, **kwargs) -> torch.Tensor:
        """Run the UNet through its down and mid blocks only; return the pooled features."""
        self._stop = True
        try:
            self.unet(*args, **kwargs)
        except _StopForward:
            pass
        finally:
            self._stop = False
        return self.pop()

    def remove(self) -> None:
        self.handle.remove()


class AttributeHead(nn.Module):
    """A two-layer MLP from pooled h-space features to attribute-group logits."""

    def __init__(self, in_features: int, num_groups: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, num_groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def adversary_losses(
    head: AttributeHead,
    features: torch.Tensor,
    groups: torch.Tensor,
    target: torch.Tensor,
    *,
    loss: Literal["confusion", "reversal"],
    lam: float,
) -> dict[str, torch.Tensor]:
    """The head's and the LoRA's terms for the labelled examples of a batch.

    Args:
        head: The attribute head.
        features: ``(B, C)`` pooled mid-block features (carrying the LoRA's graph).
        groups: ``(B,)`` group index per example, -1 where unknown (those are left out).
        target: ``(B, K)`` target mix of each example's concept.
        loss: ``confusion`` or ``reversal``.
        lam: λ.

    Returns:
        ``total`` (add to the training loss), ``head_loss`` (cross-entropy), ``lora_loss`` (the
        LoRA's own term, for logging), ``accuracy`` and ``majority`` (the majority-class rate).
    """
    known = groups >= 0
    # A zero that still touches every head weight, so DDP reduces their (zero) gradients on a rank
    # whose batch has no usable example instead of waiting for them.
    zero = features.sum() * 0.0 + sum(p.sum() for p in head.parameters()) * 0.0
    if not known.any():
        return {k: zero for k in ("total", "head_loss", "lora_loss", "accuracy", "majority")}
    f, y, q = features[known], groups[known], target[known]
    if loss == "reversal":
        logits = head(grad_reverse(f, lam))
        ce = F.cross_entropy(logits, y)
        total, lora_term = ce, -lam * ce.detach()
    else:
        logits = head(f.detach())
        ce = F.cross_entropy(logits, y)
        # The LoRA sees the head as fixed: functional call with detached weights.
        frozen = {k: v.detach() for k, v in head.named_parameters()}
        logp = F.log_softmax(functional_call(head, frozen, (f,)), dim=-1)
        kl = (q * (torch.log(q.clamp_min(1e-8)) - logp)).sum(-1).mean()
        total, lora_term = ce + lam * kl, kl
    acc = (logits.argmax(-1) == y).float().mean()
    majority = torch.bincount(y, minlength=q.shape[1]).max().float() / len(y)
    return {
        "total": total,
        "head_loss": ce.detach(),
        "lora_loss": lora_term.detach(),
        "accuracy": acc,
        "majority": majority,
    }
