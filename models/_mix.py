"""Any mix after deployment: one LoRA adapter per attribute class, each trained toward its class alone,
and each image generated with one of them, drawn in the proportions asked for.

An adapter trained toward 100% red turns the neutral prompt red; one trained toward 100% blue turns it
blue. Drawing, per image, the red adapter with probability ``w`` gives a red share of
``w * r_red + (1 - w) * r_blue`` (``r_k``: the share adapter ``k`` alone gives), which is linear in
``w``: any share between the two adapters' is reached by one ``w`` per concept, read off two measured
points (:mod:`fairtune.eval._mix`). Each image passes through one fused adapter, so it costs exactly
what the base model costs; explicit prompts go through the same adapters.

In a diffusers pipeline the same thing is::

    pipe.load_lora_weights("red/", adapter_name="red")
    pipe.load_lora_weights("blue/", adapter_name="blue")
    classes = draw_classes(len(seeds), target={"red": 0.7, "blue": 0.3}, assignment="stratified")
    for cls in ("red", "blue"):
        pipe.set_adapters(cls, adapter_weights=1.5)   # the scale; or fuse each into its own copy
        ... generate the images whose class is ``cls``
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ._lora import adapter_copy
from ._prompt_augmentation import draw_classes


class ClassAdapterMix:
    """A base backbone with one fused LoRA adapter per class (each on its own copy of the UNet; the
    text encoder, VAE and prompt cache are shared), sampling each image with the adapter of its class.

    Args:
        backbone: The base model (never changed).
        adapters: Class name to an adapter folder (``pytorch_lora_weights.safetensors``), in the
            order of the attribute's classes.
        fuse: Fuse each adapter into its UNet copy (the base model's cost per image).
        mix: The share of images each class's adapter draws when :meth:`sample` is given no
            ``classes`` (drawn stratified per distinct prompt, as the comparison's ``class_adapters``
            method draws them); ``None``: ``classes`` must be given.
        scale: Every adapter's weight (fused: ``fuse_lora(lora_scale=scale)``; unfused:
            ``set_adapters(cls, adapter_weights=scale)``): 1 as trained; above 1 pushes
            wordings and concepts the adapters never trained on further toward their class
            (docs/dial.md).

    Raises:
        ValueError: No adapter given, or a mix naming a class without an adapter.
        FileNotFoundError: A folder without the weights file.
    """

    def __init__(
        self,
        backbone,
        adapters: Mapping[str, str | os.PathLike],
        *,
        fuse: bool = True,
        mix: Mapping[str, float] | None = None,
        scale: float = 1.0,
    ) -> None:
        if not adapters:
            raise ValueError("class adapters: give one adapter folder per class, e.g. {red: DIR, blue: DIR}")
        self.classes = list(adapters)
        if mix is not None:
            unknown = sorted(set(mix) - set(self.classes))
            if unknown:
                raise ValueError(f"mix names classes {unknown} without an adapter; adapters: {self.classes}")
            mix = {c: float(mix.get(c, 0.0)) for c in self.classes}
        self.mix = mix
        self.scale = float(scale)
        self.backbones = {
            c: adapter_copy(backbone, Path(a), fuse=fuse, scale=self.scale) for c, a in adapters.items()
        }

    def to(self, device) -> ClassAdapterMix:
        for bb in self.backbones.values():
            bb.to(device)
        return self

    def sample(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int],
        classes: Sequence[str] | None = None,
        steps: int = 25,
        guidance_scale: float = 2.0,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1]: image ``i`` from ``prompts[i]`` and ``seeds[i]`` with the
        adapter of ``classes[i]`` (the images of one class are sampled together, then put back in order).
        Without ``classes``, each distinct prompt's images draw their classes from the ``mix`` given at
        construction, stratified (the same prompts and mix always give the same draw), so the object
        samples like a :class:`~fairtune.models.Backbone`.

        Raises:
            ValueError: Lengths differ, a class has no adapter, or no classes and no mix.
        """
        if classes is None:
            if self.mix is None:
                raise ValueError("give each image's class, or construct ClassAdapterMix with a mix")
            classes = draw_classes(list(prompts), target=self.mix, assignment="stratified", seed=0)
        if not len(prompts) == len(seeds) == len(classes):
            raise ValueError(f"{len(prompts)} prompts, {len(seeds)} seeds and {len(classes)} classes differ")
        unknown = sorted(set(classes) - set(self.classes))
        if unknown:
            raise ValueError(f"classes {unknown} have no adapter; adapters are given for {self.classes}")
        out: torch.Tensor | None = None
        for c, bb in self.backbones.items():
            idx = [i for i, k in enumerate(classes) if k == c]
            if not idx:
                continue
            x = bb.sample(
                [prompts[i] for i in idx], seeds=[seeds[i] for i in idx], steps=steps,
                guidance_scale=guidance_scale, batch_size=batch_size,
            )  # fmt: skip
            if out is None:
                out = torch.empty((len(prompts), *x.shape[1:]), dtype=x.dtype)
            out[idx] = x
        if out is None:
            raise ValueError("no image to sample: prompts is empty")
        return out
