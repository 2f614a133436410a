"""``fairtune compare`` and ``fairtune audit``: every method on the same prompts, seeds and judges.

For each method (the base model, LoRA adapters, Fair Diffusion, prompt augmentation) the comparison
generates ``n_per_prompt`` images for every prompt, image ``i`` of every prompt from seed ``seed + i``
(:meth:`~fairtune.models.Backbone.initial_noise`), judges them, and writes ``metrics.json`` (per method
and concept: judged shares, deviation, fairness discrepancy, KL, bias, their 95% bootstrap intervals,
fidelity; per method a summary with the cost in UNet evaluations and seconds per image) and a report
(``report.md`` and a self-contained ``report.html``, see :mod:`fairtune.eval._report`).

Prompts come in groups with a role: ``seen`` (neutral prompts of concepts the adapter trained on),
``heldout`` (concepts it never saw) and ``paraphrase`` (wordings it never saw). The summary reports the
mean deviation per role, and for ``seen`` its 95% interval (bootstrap over images within each concept,
then the mean over concepts).

``audit`` is the one-model case: one pipeline (a model folder, optionally with an adapter), the same
metrics and report.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from fairtune.data import AttributeSpec, Target, TargetConfig, concept_name
from fairtune.models import (
    LORA_WEIGHT_NAME,
    Backbone,
    BackboneConfig,
    FairDiffusionConfig,
    PromptAugmentationConfig,
    augment_prompts,
    fair_diffusion_sample,
    load_adapter,
    unet_evals_per_image,
)
from fairtune.train._fairness import ClassifierConfig, load_classifier

from ._harness import GenerationConfig
from ._judges import UNDETERMINED, load_judges
from ._metrics import concept_metrics, fidelity, frechet_distance

ROLES = ("seen", "heldout", "paraphrase")
METHOD_KINDS = ("base", "adapter", "fair_diffusion", "prompt_augmentation")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ============================================================================================ config
@dataclass
class PromptGroup:
    """A group of prompts with one role, one prompt per concept.

    Either ``template`` and ``values`` (``template`` and ``concept`` formatted with each value), or
    ``prompts`` (concept to prompt).

    Attributes:
        name: Unique name of the group; an entry of it is keyed ``"<name>/<concept>"``.
        role: ``seen`` (neutral prompts of concepts the adapter trained on), ``heldout`` (concepts it
            never trained on) or ``paraphrase`` (wordings it never trained on).
        template: Prompt with a ``{value}`` field, e.g. ``"a handwritten digit {value}"``.
        values: What ``{value}`` takes, one prompt each (e.g. the digits ``[0, 1, 2]``).
        concept: Concept name with a ``{value}`` field (``"digit {value}"``); a concept judge and a
            per-concept target look concepts up by this name.
        prompts: Concept to prompt, instead of ``template`` and ``values``.
    """

    name: str
    role: Literal["seen", "heldout", "paraphrase"] = "seen"
    template: str | None = None
    values: list[int | str] = field(default_factory=list)
    concept: str = "{value}"
    prompts: dict[str, str] | None = None

    def entries(self) -> list[PromptEntry]:
        """The group's prompts, one :class:`PromptEntry` per concept.

        Raises:
            ValueError: When the group names no prompt, names both forms, or has a bad template.
        """
        if self.role not in ROLES:
            raise ValueError(f"prompt group {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.prompts is not None and (self.template is not None or self.values):
            raise ValueError(
                f"prompt group {self.name!r}: give either prompts (concept -> prompt) or template + "
                "values, not both"
            )
        if self.prompts is not None:
            pairs = list(self.prompts.items())
        else:
            if self.template is None or "{value}" not in self.template:
                raise ValueError(
                    f"prompt group {self.name!r} needs a template with a {{value}} field (got "
                    f"{self.template!r}) and values, or prompts (concept -> prompt)"
                )
            pairs = [(self.concept.format(value=v), self.template.format(value=v)) for v in self.values]
        if not pairs:
            raise ValueError(f"prompt group {self.name!r} is empty: give it values or prompts")
        for concept, prompt in pairs:
            if not str(concept).strip() or not str(prompt).strip():
                raise ValueError(f"prompt group {self.name!r} has an empty concept or prompt: {concept!r}")
        return [
            PromptEntry(
                key=f"{self.name}/{c}", group=self.name, role=self.role, concept=str(c), prompt=str(p)
            )
            for c, p in pairs
        ]


@dataclass
class PromptEntry:
    """One prompt of the comparison (``n_per_prompt`` images are generated for it).

    Attributes:
        key: ``"<group>/<concept>"``, unique in a comparison.
        group: Name of its :class:`PromptGroup`.
        role: The group's role.
        concept: The concept it prompts for.
        prompt: The prompt text.
    """

    key: str
    group: str
    role: str
    concept: str
    prompt: str


@dataclass
class MethodConfig:
    """One method of a comparison.

    Attributes:
        name: Unique name (a column of the report).
        kind: ``base`` (the backbone as it is), ``adapter`` (with a LoRA adapter), ``fair_diffusion``
            (semantic guidance toward a class drawn per image) or ``prompt_augmentation`` (the class's
            word written into the prompt); the last two may also run on an adapter.
        adapter: A folder holding ``pytorch_lora_weights.safetensors`` (a run's ``adapter/``);
            required for ``adapter``, optional for the two inference-time baselines.
        fuse: Merge the adapter into the UNet's weights, so it costs what the base model costs.
        fair_diffusion: ``fair_diffusion`` only: edit prompts per class and SEGA parameters.
        prompt_augmentation: ``prompt_augmentation`` only: the word per class.
    """

    name: str
    kind: Literal["base", "adapter", "fair_diffusion", "prompt_augmentation"] = "base"
    adapter: str | None = None
    fuse: bool = True
    fair_diffusion: FairDiffusionConfig | None = None
    prompt_augmentation: PromptAugmentationConfig | None = None


@dataclass
class JudgeConfig:
    """The judges that score generated images (never a model used in training).

    Attributes:
        kind: ``colored_digits``: the ColoredDigits-Bias judges written by ``fairtune judges train``
            (colour by hue or CNN, the digit CNN for fidelity and Fréchet features). ``classifier``: any
            attribute classifier module with safetensors weights (e.g. for Stable Diffusion).
        path: ``colored_digits``: the judges folder (``judges.json``).
        color_judge: ``colored_digits``: ``hue`` (exact on the benchmark) or ``cnn``.
        attribute: ``classifier``: name of the attribute it judges (must be the target's attribute).
        classes: ``classifier``: the attribute's class names, in the order of its outputs.
        classifier: ``classifier``: the attribute classifier (module path, init args, safetensors
            weights); its ``weights`` must be set (empty: none given).
        min_confidence: ``classifier``: an image whose top softmax probability is below this is
            counted as undetermined.
        concept_classifier: ``classifier``: an optional concept classifier, used when its
            ``weights`` are set; with it, fidelity is reported (and its ``features``, if it has
            them, feed the Fréchet distance).
        concept_classes: Its class names: the concept names of the prompts it recognises.
        reference: Real images for the Fréchet distance: a ColoredDigits-Bias data folder (its
            held-out split) or a folder of image files; ``None``: no Fréchet distance.
        n_reference: Reference images used (a seeded random subset).
        batch_size: Images per judge batch.
    """

    kind: Literal["colored_digits", "classifier"] = "colored_digits"
    path: str | None = "runs/judges/colored-digits-16"
    color_judge: Literal["hue", "cnn"] = "hue"
    attribute: str = "color"
    classes: list[str] | None = None
    classifier: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(weights=""))
    min_confidence: float = 0.0
    concept_classifier: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(weights=""))
    concept_classes: list[str] | None = None
    reference: str | None = "runs/data/colored-digits-16"
    n_reference: int = 2000
    batch_size: int = 512


def _default_backbone() -> BackboneConfig:
    return BackboneConfig(kind="tiny", pretrained="colored-digits-16")


@dataclass
class CompareConfig:
    """A comparison: methods, prompts, judges, target and generation settings.

    Attributes:
        methods: The methods, each with a unique name.
        prompts: Prompt groups (seen, held-out, paraphrase).
        backbone: The base model every method starts from.
        judges: The judges.
        target: The attribute mix the outputs should follow (over the judges' classes).
        generation: Images per prompt, DDIM steps, guidance, first seed, batch size (the same for
            every method, so the timings compare).
        n_boot: Bootstrap resamples of every interval.
        grid_columns: Images per prompt shown in each method's image grid.
        frechet_roles: Prompt roles whose images enter the Fréchet distance (the neutral prompts of
            every concept by default, matching the reference set's concept mix).
        title: Title of the report.
    """

    methods: list[MethodConfig]
    prompts: list[PromptGroup]
    backbone: BackboneConfig = field(default_factory=_default_backbone)
    judges: JudgeConfig = field(default_factory=JudgeConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    n_boot: int = 1000
    grid_columns: int = 8
    frechet_roles: list[Literal["seen", "heldout", "paraphrase"]] = field(
        default_factory=lambda: ["seen", "heldout"]
    )
    title: str = "fairtune compare"


def colored_digits_prompts(
    *,
    seen: Sequence[int] = tuple(range(8)),
    heldout: Sequence[int] = (8, 9),
    paraphrase: Sequence[int] = (1, 3, 5, 7),
    paraphrase_template: str = "a drawing of the number {value}",
) -> list[PromptGroup]:
    """The ColoredDigits-Bias prompt groups: neutral prompts of seen and held-out digits, and a
    paraphrase the training never saw."""
    groups = [
        PromptGroup("seen", "seen", "a handwritten digit {value}", list(seen), "digit {value}"),
        PromptGroup("heldout", "heldout", "a handwritten digit {value}", list(heldout), "digit {value}"),
        PromptGroup("paraphrase", "paraphrase", paraphrase_template, list(paraphrase), "digit {value}"),
    ]
    return [g for g in groups if g.values]


# ============================================================================================ judges
class JudgePanel:
    """The judges of a comparison behind one interface.

    Args:
        attribute: Name of the judged attribute.
        classes: Its classes (label ``k`` is ``classes[k]``; ``-1`` undetermined).
        attribute_fn: Images to attribute labels.
        concept_classes: Concept names a concept judge recognises (``None``: no concept judge).
        concept_fn: Images to concept labels (indices into ``concept_classes``).
        feature_fn: Images to features for the Fréchet distance (``None``: not available).
        reference: Real images for the Fréchet distance (``None``: not available).
        description: What the report says about the judges.
        batch_size: Images per judge batch.
        image_size: Image side the judges expect (``None``: any).
    """

    def __init__(
        self,
        *,
        attribute: str,
        classes: list[str],
        attribute_fn,
        concept_classes: list[str] | None = None,
        concept_fn=None,
        feature_fn=None,
        reference: torch.Tensor | None = None,
        description: str = "",
        batch_size: int = 512,
        image_size: int | None = None,
    ) -> None:
        self.attribute, self.classes = attribute, list(classes)
        self.attribute_fn, self.concept_fn, self.feature_fn = attribute_fn, concept_fn, feature_fn
        self.concept_classes = list(concept_classes) if concept_classes is not None else None
        self.reference = reference
        self.description = description
        self.batch_size = batch_size
        self.image_size = image_size
        self._reference_features: np.ndarray | None = None

    def concept_index(self, concept: str) -> int | None:
        """Index of ``concept`` among the concept judge's classes, or ``None`` when it cannot judge it."""
        if self.concept_classes is None or concept not in self.concept_classes:
            return None
        return self.concept_classes.index(concept)

    @property
    def has_frechet(self) -> bool:
        return self.feature_fn is not None and self.reference is not None and len(self.reference) >= 2

    @torch.no_grad()
    def _batched(self, fn, images: torch.Tensor, desc: str, progress: bool) -> np.ndarray:
        out = []
        for i in tqdm(
            range(0, len(images), self.batch_size), desc=desc, disable=not progress, leave=False, unit="batch"
        ):
            out.append(torch.as_tensor(fn(images[i : i + self.batch_size])).cpu())
        return torch.cat(out).numpy()

    def judge(self, images: torch.Tensor, *, desc: str = "judge", progress: bool = True) -> dict:
        """Attribute labels, concept labels (or ``None``) and Fréchet features (or ``None``)."""
        return {
            "attribute": self._batched(self.attribute_fn, images, f"{desc}: {self.attribute}", progress),
            "concept": None
            if self.concept_fn is None
            else self._batched(self.concept_fn, images, f"{desc}: concept", progress),
            "features": None
            if not self.has_frechet
            else self._batched(self.feature_fn, images, f"{desc}: features", progress),
        }

    def reference_features(self, *, progress: bool = True) -> np.ndarray | None:
        if not self.has_frechet:
            return None
        if self._reference_features is None:
            self._reference_features = self._batched(self.feature_fn, self.reference, "reference", progress)
        return self._reference_features


def load_reference_images(path: str | Path, *, n: int = 2000, image_size: int | None = None, seed: int = 0):
    """Real images for the Fréchet distance, ``(n, 3, H, W)`` in [0, 1].

    Args:
        path: A ColoredDigits-Bias data folder (its held-out split, never trained on) or a folder of
            image files (searched recursively).
        n: How many (a seeded random subset; all when fewer).
        image_size: Resize to this side (the generated images' size); ``None`` keeps the size.
        seed: Seed of the subset.

    Raises:
        FileNotFoundError: When the folder does not exist or holds no image.
    """
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"judges.reference={str(path)!r} does not exist")
    if (path / "table").is_dir():
        from fairtune.data import load_table

        from ._judges import images_from_table

        held = load_table(str(path / "table"), split="heldout")
        idx = np.random.default_rng(seed).permutation(len(held))[:n]
        x = images_from_table(held.select(sorted(idx.tolist())))
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(
                f"judges.reference={str(path)!r} holds no image ({', '.join(IMAGE_SUFFIXES)}) "
                "and is not a ColoredDigits-Bias data folder (no table/)"
            )
        idx = np.random.default_rng(seed).permutation(len(files))[:n]
        size = image_size
        arrs = []
        for i in sorted(idx.tolist()):
            im = Image.open(files[i]).convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            arrs.append(np.asarray(im, dtype=np.uint8))
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0
    if image_size is not None and x.shape[-1] != image_size:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
        x = x.clamp(0, 1)
    return x


def _classifier_fn(cfg: ClassifierConfig, *, n_classes: int, min_confidence: float, what: str):
    if cfg.input != "pixels":
        raise ValueError(f"{what}.input must be 'pixels' to judge generated images, got {cfg.input!r}")
    model = load_classifier(cfg)

    def predict(x: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        if logits.ndim != 2 or logits.shape[1] != n_classes:
            raise ValueError(
                f"{what} ({cfg.module}) returned logits of shape {tuple(logits.shape)}, "
                f"expected (batch, {n_classes}) for its {n_classes} named classes"
            )
        conf, label = torch.softmax(logits.float() / cfg.temperature, dim=1).max(1)
        return torch.where(conf >= min_confidence, label, torch.full_like(label, UNDETERMINED))

    return model, predict


def build_judges(cfg: JudgeConfig, *, image_size: int | None = None) -> JudgePanel:
    """Load the judges ``cfg`` names (and the reference images of the Fréchet distance).

    Raises:
        FileNotFoundError: A judges folder, weights file or reference folder is missing.
        ValueError: A setting does not fit the judge kind.
    """
    reference = None
    if cfg.kind == "colored_digits":
        if cfg.path is None:
            raise ValueError(
                "judges.kind='colored_digits' needs judges.path (a `fairtune judges train` folder)"
            )
        judges = load_judges(cfg.path)
        size = judges.report.get("image_size")
        if image_size is not None and size is not None and int(size) != int(image_size):
            raise ValueError(
                f"the judges in {cfg.path} were trained on {size}x{size} images but the model "
                f"generates {image_size}x{image_size}"
            )
        if cfg.reference is not None:
            reference = load_reference_images(cfg.reference, n=cfg.n_reference, image_size=image_size)
        return JudgePanel(
            attribute="color",
            classes=list(judges.colors),
            attribute_fn=lambda x: judges.color(x, judge=cfg.color_judge),
            concept_classes=[concept_name(d) for d in range(10)],
            concept_fn=judges.digit,
            feature_fn=judges.features,
            reference=reference,
            description=(
                f"ColoredDigits-Bias judges from `{cfg.path}`: colour by the {cfg.color_judge} judge, "
                "fidelity by the digit CNN, Fréchet distance on its 64-d features"
                + (f" against {len(reference)} held-out real images" if reference is not None else "")
            ),
            batch_size=cfg.batch_size,
            image_size=size,
        )
    if cfg.kind == "classifier":
        if not cfg.classifier.weights or not cfg.classes:
            raise ValueError(
                "judges.kind='classifier' needs judges.classifier (module, init_args, weights) and "
                "judges.classes (the class names of its outputs, in order)"
            )
        attr_model, attr_fn = _classifier_fn(
            cfg.classifier, n_classes=len(cfg.classes), min_confidence=cfg.min_confidence,
            what="judges.classifier",
        )  # fmt: skip
        concept_fn = concept_model = None
        if cfg.concept_classifier.weights:
            if not cfg.concept_classes:
                raise ValueError("judges.concept_classifier needs judges.concept_classes (its class names)")
            concept_model, concept_fn = _classifier_fn(
                cfg.concept_classifier, n_classes=len(cfg.concept_classes), min_confidence=0.0,
                what="judges.concept_classifier",
            )  # fmt: skip
        feature_model = next(
            (m for m in (concept_model, attr_model) if m is not None and hasattr(m, "features")), None
        )
        if cfg.reference is not None and feature_model is not None:
            reference = load_reference_images(cfg.reference, n=cfg.n_reference, image_size=image_size)
        return JudgePanel(
            attribute=cfg.attribute,
            classes=list(cfg.classes),
            attribute_fn=attr_fn,
            concept_classes=cfg.concept_classes if concept_fn is not None else None,
            concept_fn=concept_fn,
            feature_fn=feature_model.features if feature_model is not None else None,
            reference=reference,
            description=(
                f"attribute `{cfg.attribute}` judged by `{cfg.classifier.module}` "
                f"({cfg.classifier.weights}) over {list(cfg.classes)}"
                + (f", concept by `{cfg.concept_classifier.module}`" if concept_fn is not None else "")
            ),
            batch_size=cfg.batch_size,
        )
    raise ValueError(f"judges.kind must be 'colored_digits' or 'classifier', got {cfg.kind!r}")


# ======================================================================================== validation
def prompt_entries(groups: Sequence[PromptGroup]) -> list[PromptEntry]:
    """All prompts of the groups, in order.

    Raises:
        ValueError: When there is no prompt, or two groups share a name.
    """
    if not groups:
        raise ValueError("prompts is empty: give at least one prompt group (e.g. seen digits)")
    names = [g.name for g in groups]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"prompt group names must be unique, repeated: {dup}")
    entries = [e for g in groups for e in g.entries()]
    keys = [e.key for e in entries]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"a prompt group names a concept twice: {dup}")
    return entries


def validate_methods(methods: Sequence[MethodConfig]) -> None:
    """Check every method before any work: names, kinds, adapters and baseline settings.

    Raises:
        ValueError: An empty list, a repeated name, an unknown kind, or a missing baseline setting.
        FileNotFoundError: An adapter folder without ``pytorch_lora_weights.safetensors``.
    """
    if not methods:
        raise ValueError("methods is empty: give at least one method (e.g. {name: base, kind: base})")
    names = [m.name for m in methods]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"method names must be unique, repeated: {dup}")
    for m in methods:
        if not m.name or "/" in m.name:
            raise ValueError(f"method name {m.name!r} must be non-empty and contain no '/'")
        if m.kind not in METHOD_KINDS:
            raise ValueError(f"method {m.name!r}: unknown kind {m.kind!r}; known kinds: {list(METHOD_KINDS)}")
        if m.kind == "adapter" and m.adapter is None:
            raise ValueError(f"method {m.name!r} has kind 'adapter' but no adapter folder")
        if m.kind == "base" and m.adapter is not None:
            raise ValueError(f"method {m.name!r} has kind 'base' but names an adapter; use kind 'adapter'")
        if m.adapter is not None and not (Path(m.adapter) / LORA_WEIGHT_NAME).is_file():
            raise FileNotFoundError(
                f"method {m.name!r}: adapter folder {m.adapter!r} has no {LORA_WEIGHT_NAME} "
                "(train one with `fairtune fit`; the run writes it to <root>/adapter/)"
            )
        if m.kind == "fair_diffusion" and m.fair_diffusion is None:
            raise ValueError(
                f"method {m.name!r} has kind 'fair_diffusion' but no fair_diffusion settings "
                "(e.g. fair_diffusion: {edit_prompts: {red: red, blue: blue}})"
            )
        if m.kind == "prompt_augmentation" and m.prompt_augmentation is None:
            raise ValueError(
                f"method {m.name!r} has kind 'prompt_augmentation' but no prompt_augmentation settings "
                "(e.g. prompt_augmentation: {words: {red: red, blue: blue}})"
            )
        if m.fair_diffusion is not None and m.kind != "fair_diffusion":
            raise ValueError(f"method {m.name!r}: fair_diffusion settings on a {m.kind!r} method")
        if m.prompt_augmentation is not None and m.kind != "prompt_augmentation":
            raise ValueError(f"method {m.name!r}: prompt_augmentation settings on a {m.kind!r} method")


def build_target(cfg: TargetConfig, panel: JudgePanel) -> Target:
    """The target over the judged attribute's classes.

    Raises:
        ValueError: When the target is over another attribute (or a joint of several).
    """
    if isinstance(cfg, Mapping):
        cfg = TargetConfig(**cfg)
    if list(cfg.attributes) != [panel.attribute]:
        raise ValueError(
            f"target.attributes={list(cfg.attributes)} but the judges judge one attribute, "
            f"{panel.attribute!r}: set target.attributes to [{panel.attribute}]"
        )
    return Target(cfg, AttributeSpec({panel.attribute: panel.classes}))


def _check_baseline_classes(methods: Sequence[MethodConfig], classes: list[str]) -> None:
    for m in methods:
        named = (
            m.fair_diffusion.edit_prompts
            if m.fair_diffusion is not None
            else m.prompt_augmentation.words
            if m.prompt_augmentation is not None
            else None
        )
        if named is not None and set(named) != set(classes):
            what = "edit_prompts" if m.fair_diffusion is not None else "words"
            raise ValueError(
                f"method {m.name!r}: {what} names classes {sorted(named)} but the judged classes are "
                f"{classes}"
            )


# ======================================================================================== generation
class UNetCounter:
    """Counts a UNet's forward calls and the batch rows they run (a forward hook), and advances a
    progress bar by the rows as they finish; ``rows / images`` is the UNet evaluations spent per image."""

    def __init__(self, unet: torch.nn.Module, bar=None) -> None:
        self.unet, self.bar = unet, bar
        self.calls = self.rows = 0
        self._handle = None

    def _hook(self, module, args, kwargs, output) -> None:
        x = args[0] if args else kwargs["sample"]
        n = int(x.shape[0])
        self.calls += 1
        self.rows += n
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self) -> UNetCounter:
        self._handle = self.unet.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


@dataclass
class MethodImages:
    """What one method generated.

    Attributes:
        images: ``(len(entries) * n_per_prompt, 3, H, W)`` in [0, 1], prompt-major.
        prompts: The prompt each image was generated from (augmented prompts for prompt augmentation).
        drawn: The class drawn for each image (the two inference-time baselines), else ``None``.
        seconds: Wall time of the generation.
        unet_calls: UNet forward calls.
        unet_rows: Batch rows over those calls (UNet evaluations).
        unet_evals_formula: UNet evaluations per image that the method's formula gives.
    """

    images: torch.Tensor
    prompts: list[str]
    drawn: list[str] | None
    seconds: float
    unet_calls: int
    unet_rows: int
    unet_evals_formula: int


def method_backbone(base: Backbone, method: MethodConfig) -> Backbone:
    """The backbone a method samples from: ``base`` itself, or (with an adapter) a backbone sharing
    ``base``'s text encoder, VAE and prompt cache around a copy of its UNet carrying the adapter, so
    ``base`` is never changed."""
    if method.adapter is None:
        return base
    bb = Backbone(
        base.config,
        copy.deepcopy(base.unet),
        base.text_encoder,
        base.tokenizer,
        base.noise_scheduler,
        base.vae,
    )
    bb._prompt_cache = base._prompt_cache
    return load_adapter(bb, method.adapter, fuse=method.fuse)


def generate_method(
    backbone: Backbone,
    method: MethodConfig,
    entries: Sequence[PromptEntry],
    *,
    generation: GenerationConfig,
    target: Target,
    progress: bool = True,
) -> MethodImages:
    """Generate ``n_per_prompt`` images per prompt with one method (image ``i`` of each prompt from
    seed ``generation.seed + i``), counting UNet evaluations and timing it.

    Args:
        backbone: The backbone the method samples from (see :func:`method_backbone`).
        method: The method.
        entries: The prompts.
        generation: Generation settings.
        target: The target (drawn per image by the inference-time baselines, per concept).
        progress: Show a progress bar.
    """
    gen = generation
    n = gen.n_per_prompt
    prompts = [e.prompt for e in entries for _ in range(n)]
    seeds = [gen.seed + i for _ in entries for i in range(n)]
    concepts = [e.concept for e in entries for _ in range(n)]
    n_edits = len(method.fair_diffusion.edit_prompts) if method.fair_diffusion is not None else 0
    formula = unet_evals_per_image(method.kind, steps=gen.steps, n_edits=n_edits)
    # Warm up outside the timing (first-call allocations), and encode the neutral prompts, so no
    # method pays for work another method already did.
    backbone.encode_prompts(list(dict.fromkeys([*prompts, ""])))
    backbone.sample(prompts[:1], seeds=seeds[:1], steps=1, guidance_scale=gen.guidance_scale, batch_size=1)

    # The baselines draw a class per image from the target of its concept: one call per distinct target.
    parts: dict[tuple[float, ...], list[int]] = {}
    for i, c in enumerate(concepts):
        parts.setdefault(tuple(target.proportions(c)), []).append(i)

    used_prompts = list(prompts)
    drawn: list[str] | None = None if method.kind in ("base", "adapter") else [""] * len(prompts)
    images = None
    bar = tqdm(
        total=len(prompts) * formula, desc=f"generate {method.name}", unit="eval", disable=not progress,
        unit_scale=True,
    )  # fmt: skip
    with UNetCounter(backbone.unet, bar) as counter:
        t0 = time.perf_counter()
        if method.kind in ("base", "adapter"):
            images = backbone.sample(
                prompts, seeds=seeds, steps=gen.steps, guidance_scale=gen.guidance_scale,
                batch_size=gen.batch_size,
            )  # fmt: skip
        else:
            chunks = {}
            for q, idx in parts.items():
                tq = dict(zip(target.groups, q))
                ps, ss = [prompts[i] for i in idx], [seeds[i] for i in idx]
                if method.kind == "prompt_augmentation":
                    aug, cls = augment_prompts(ps, config=method.prompt_augmentation, target=tq)
                    x = backbone.sample(
                        aug, seeds=ss, steps=gen.steps, guidance_scale=gen.guidance_scale,
                        batch_size=gen.batch_size,
                    )  # fmt: skip
                    for i, p in zip(idx, aug):
                        used_prompts[i] = p
                else:
                    x, cls = fair_diffusion_sample(
                        backbone, ps, seeds=ss, config=method.fair_diffusion, target=tq, steps=gen.steps,
                        guidance_scale=gen.guidance_scale, batch_size=gen.batch_size,
                    )  # fmt: skip
                for i, c in zip(idx, cls):
                    drawn[i] = c
                chunks[q] = x
            images = torch.empty((len(prompts), *next(iter(chunks.values())).shape[1:]))
            for q, idx in parts.items():
                images[idx] = chunks[q]
        seconds = time.perf_counter() - t0
    bar.close()
    return MethodImages(
        images=images.cpu(),
        prompts=used_prompts,
        drawn=drawn,
        seconds=seconds,
        unet_calls=counter.calls,
        unet_rows=counter.rows,
        unet_evals_formula=formula,
    )


# ========================================================================================== judging
def _nanmean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else None


def mean_deviation_interval(
    labels: Sequence[np.ndarray],
    targets: Sequence[Sequence[float]],
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean deviation over concepts: each resample redraws the
    images within every concept (placed labels only), takes each concept's deviation, then the mean.

    Args:
        labels: Per concept, the judged labels (``-1`` undetermined, left out).
        targets: Per concept, the target vector.
        n_boot: Resamples.
        alpha: 1 − coverage.
        seed: Seed of the resampling.

    Returns:
        ``(low, high)``, or ``None`` when no concept has a placed image.
    """
    rng = np.random.default_rng(seed)
    devs = []
    for y, q in zip(labels, targets):
        y = np.asarray(y, dtype=np.int64)
        y = y[y >= 0]
        if y.size == 0:
            continue
        q = np.asarray(q, dtype=np.float64)
        onehot = np.eye(q.size)[y]  # (n, K)
        idx = rng.integers(0, y.size, size=(n_boot, y.size))
        p = onehot[idx].mean(axis=1)  # (n_boot, K)
        devs.append(np.abs(p - q).max(axis=1))
    if not devs:
        return None
    mean = np.mean(devs, axis=0)
    lo, hi = np.quantile(mean, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def judge_method(
    result: MethodImages,
    entries: Sequence[PromptEntry],
    *,
    panel: JudgePanel,
    target: Target,
    n_per_prompt: int,
    n_boot: int = 1000,
    frechet_roles: Sequence[str] = ("seen", "heldout"),
    progress: bool = True,
    desc: str = "judge",
) -> dict:
    """Per-prompt metrics and the method's summary (fairness per role, fidelity, Fréchet, cost)."""
    judged = panel.judge(result.images, desc=desc, progress=progress)
    attr, conc, feats = judged["attribute"], judged["concept"], judged["features"]
    per_concept: dict[str, dict] = {}
    for b, e in enumerate(entries):
        sl = slice(b * n_per_prompt, (b + 1) * n_per_prompt)
        q = target.proportions(e.concept)
        r = concept_metrics(attr[sl], target=q, concept=e.concept, n_boot=n_boot, seed=b).to_dict()
        r.update(key=e.key, group=e.group, role=e.role, prompt=e.prompt, classes=list(target.groups))
        ci = panel.concept_index(e.concept)
        r["fidelity"] = (
            fidelity(conc[sl], expected=np.full(n_per_prompt, ci))
            if conc is not None and ci is not None
            else None
        )
        if result.drawn is not None:
            drawn = np.array([target.groups.index(c) for c in result.drawn[sl]])
            r["drawn_share"] = (np.bincount(drawn, minlength=len(target.groups)) / len(drawn)).tolist()
            # Of the images the judge placed, the share whose judged class is the class drawn for it.
            placed = attr[sl] >= 0
            r["follows_drawn_class"] = (
                float(np.mean(attr[sl][placed] == drawn[placed])) if placed.any() else None
            )
        per_concept[e.key] = r

    def role_keys(role: str) -> list[str]:
        return [e.key for e in entries if e.role == role]

    summary: dict = {}
    for role in ROLES:
        keys = role_keys(role)
        devs = [per_concept[k]["dev"] for k in keys]
        summary[f"mean_dev_{role}"] = _nanmean(devs)
        finite = [d for d in devs if not math.isnan(d)]
        summary[f"worst_dev_{role}"] = float(max(finite)) if finite else None
    seen = role_keys("seen")
    for m in ("fd", "kl", "bias"):
        summary[f"mean_{m}_seen"] = _nanmean([per_concept[k][m] for k in seen])
    summary["mean_dev_seen_ci"] = None
    summary["mean_dev_seen_ci_halfwidth"] = None
    if seen:
        idx = {e.key: b for b, e in enumerate(entries)}
        ci = mean_deviation_interval(
            [attr[idx[k] * n_per_prompt : (idx[k] + 1) * n_per_prompt] for k in seen],
            [target.proportions(per_concept[k]["concept"]) for k in seen],
            n_boot=n_boot,
        )
        if ci is not None:
            summary["mean_dev_seen_ci"] = list(ci)
            summary["mean_dev_seen_ci_halfwidth"] = (ci[1] - ci[0]) / 2
    fids = [per_concept[k]["fidelity"] for k in per_concept]
    summary["fidelity"] = _nanmean(fids)
    summary["frechet"] = None
    if feats is not None:
        blocks = [b for b, e in enumerate(entries) if e.role in frechet_roles]
        rows = np.array([b * n_per_prompt + i for b in blocks for i in range(n_per_prompt)], dtype=np.int64)
        ref = panel.reference_features(progress=progress)
        if len(rows) >= 2 and ref is not None:
            summary["frechet"] = frechet_distance(feats[rows], ref)
    n_images = len(result.images)
    und = int(sum(per_concept[k]["undetermined"] for k in per_concept))
    summary.update(
        undetermined=und,
        undetermined_rate=und / max(n_images, 1),
        n_images=n_images,
        unet_evals_per_image=result.unet_rows / max(n_images, 1),
        unet_evals_per_image_formula=result.unet_evals_formula,
        unet_calls=result.unet_calls,
        seconds=result.seconds,
        sec_per_image=result.seconds / max(n_images, 1),
    )
    if result.drawn is not None:
        summary["follows_drawn_class"] = _nanmean(
            [per_concept[k]["follows_drawn_class"] for k in per_concept]
        )
    return {"per_concept": per_concept, "summary": summary}


def images_fingerprint(images: torch.Tensor) -> str:
    """SHA-256 of the images quantised to 8 bits: equal for the same images, e.g. the same seeds."""
    q = (images.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return hashlib.sha256(q.numpy().tobytes()).hexdigest()


def _jsonable(x):
    """NaN/inf to None, tuples to lists, numpy scalars to Python (``metrics.json`` stays strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


# ====================================================================================== entry points
def compare_methods(
    config: CompareConfig,
    *,
    backbone: Backbone | None = None,
    progress: bool = True,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Generate and judge every method of ``config``; write nothing.

    Everything is checked before any model is loaded: method names and kinds, adapter files,
    prompts, judges, the target and the baselines' classes.

    Args:
        config: The comparison.
        backbone: An already loaded base backbone to reuse (e.g. by a demo that just trained
            adapters); it is never changed (adapter methods run on a copy of its UNet). ``None``:
            load ``config.backbone``.
        progress: Show progress bars (generation and judging).

    Returns:
        The metrics (what ``metrics.json`` holds) and, per method, its images (prompt-major,
        ``n_per_prompt`` per prompt, in [0, 1]).

    Raises:
        ValueError: An unknown method kind, duplicate method names, no prompts, a target that does
            not fit the judges, and so on, naming the problem.
        FileNotFoundError: A missing adapter, judges folder or reference folder.
    """
    validate_methods(config.methods)
    entries = prompt_entries(config.prompts)
    gen = config.generation
    if gen.n_per_prompt < 1 or gen.steps < 1 or gen.batch_size < 1:
        raise ValueError(f"generation needs n_per_prompt, steps and batch_size >= 1, got {gen}")
    bb_cfg = config.backbone if backbone is None else backbone.config
    image_size = backbone.image_size if backbone is not None else _expected_image_size(bb_cfg)
    panel = build_judges(config.judges, image_size=image_size)
    target = build_target(config.target, panel)
    _check_baseline_classes(config.methods, target.groups)
    if backbone is None:
        backbone = Backbone.from_config(copy.deepcopy(config.backbone))
    if panel.image_size is not None and backbone.image_size != panel.image_size:
        raise ValueError(
            f"the judges expect {panel.image_size}x{panel.image_size} images but the backbone generates "
            f"{backbone.image_size}x{backbone.image_size}"
        )

    methods_out: dict[str, dict] = {}
    images_by_method: dict[str, torch.Tensor] = {}
    for m in config.methods:
        bb = method_backbone(backbone, m)
        res = generate_method(bb, m, entries, generation=gen, target=target, progress=progress)
        del bb  # with an adapter: the UNet copy carrying it
        judged = judge_method(
            res,
            entries,
            panel=panel,
            target=target,
            n_per_prompt=gen.n_per_prompt,
            n_boot=config.n_boot,
            frechet_roles=config.frechet_roles,
            progress=progress,
            desc=f"judge {m.name}",
        )
        methods_out[m.name] = {
            "kind": m.kind,
            "adapter": m.adapter,
            "images_sha256": images_fingerprint(res.images),
            **judged,
        }
        images_by_method[m.name] = res.images

    metrics = _jsonable(
        {
            "title": config.title,
            "attribute": panel.attribute,
            "classes": list(target.groups),
            "target": {"default": target.default, "per_concept": target.per_concept},
            "judges": panel.description,
            "backbone": asdict(bb_cfg),
            "image_size": backbone.image_size,
            "generation": asdict(gen),
            "n_boot": config.n_boot,
            "frechet_roles": list(config.frechet_roles),
            "prompts": [asdict(e) for e in entries],
            "methods": methods_out,
            "config": asdict(config),
        }
    )
    return metrics, images_by_method


def write_metrics(metrics: Mapping, out: str | Path) -> Path:
    """Write ``out/metrics.json`` atomically (strict JSON: NaN becomes null)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(_jsonable(dict(metrics)), indent=2, allow_nan=False))
    os.replace(tmp, out / "metrics.json")
    return out / "metrics.json"


def write_images(images_by_method: Mapping[str, torch.Tensor], metrics: Mapping, out: str | Path) -> Path:
    """Every image as a PNG, ``out/images/<k>/<prompt index>/<image index>.png`` (``k``: the method's
    position in ``metrics['methods']``), so a review page can show and flag single images."""
    from PIL import Image

    root = Path(out) / "images"
    n = int(metrics["generation"]["n_per_prompt"])
    for k, name in enumerate(metrics["methods"]):
        x = (images_by_method[name].clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        for j in range(len(x)):
            path = root / str(k) / f"{j // n:03d}" / f"{j % n:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[j]).save(path)
    return root


def run_comparison(
    config: CompareConfig,
    out: str | Path,
    *,
    backbone: Backbone | None = None,
    progress: bool = True,
    report: bool = True,
    save_images: bool = False,
) -> dict:
    """Generate, judge and report every method of ``config`` into ``out``; print the summary table.

    Args:
        config: The comparison.
        out: Output folder: ``metrics.json``, ``report.md`` (PNGs beside it), ``report.html``.
        backbone: An already loaded base backbone to reuse; never changed (see :func:`compare_methods`).
        progress: Show progress bars (generation and judging).
        report: Write the report and print the summary table (``metrics.json`` is always written).
        save_images: Also write every image (:func:`write_images`), for ``fairtune review``.

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        ValueError: An unknown method kind, duplicate method names, no prompts, a target that does
            not fit the judges, and so on, naming the problem.
        FileNotFoundError: A missing adapter, judges folder or reference folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={str(out)!r} exists and is not a folder")
    metrics, images = compare_methods(config, backbone=backbone, progress=progress)
    write_metrics(metrics, out)
    if save_images:
        write_images(images, metrics, out)
    if report:
        from ._report import summary_markdown, write_report

        write_report(metrics, images, out, grid_columns=config.grid_columns)
        print(summary_markdown(metrics))
        print(f"wrote {out / 'metrics.json'}, {out / 'report.md'}, {out / 'report.html'}", file=sys.stderr)
    return metrics


def _expected_image_size(cfg: BackboneConfig) -> int | None:
    """The image side a backbone config will generate, when it can be read without loading it."""
    from fairtune.models._backbones import resolve_shipped

    if cfg.kind != "tiny":
        return None
    if cfg.pretrained is None:
        return cfg.unet.sample_size
    unet_cfg = resolve_shipped(cfg.pretrained) / "unet" / "config.json"
    if unet_cfg.exists():
        return int(json.loads(unet_cfg.read_text()).get("sample_size", 0)) or None
    return None


def compare_command(
    *,
    out: Path,
    methods: list[MethodConfig],
    prompts: list[PromptGroup],
    backbone: BackboneConfig = _default_backbone(),  # noqa: B008 - jsonargparse reads the default
    judges: JudgeConfig = JudgeConfig(),  # noqa: B008
    target: TargetConfig = TargetConfig(),  # noqa: B008
    generation: GenerationConfig = GenerationConfig(),  # noqa: B008
    n_boot: int = 1000,
    grid_columns: int = 8,
    frechet_roles: list[Literal["seen", "heldout", "paraphrase"]] = ["seen", "heldout"],  # noqa: B006
    title: str = "fairtune compare",
) -> None:
    """Compare methods on the same prompts, seeds and judges; write OUT/metrics.json and a report.

    Methods: the base model, LoRA adapters, Fair Diffusion, prompt augmentation. The report is
    OUT/report.md (PNGs beside it) and a self-contained OUT/report.html.

    Args:
        out: Output folder.
        methods: The methods, each {name, kind, adapter, fuse, fair_diffusion, prompt_augmentation}.
        prompts: Prompt groups, each {name, role (seen|heldout|paraphrase), template, values, concept}.
        backbone: The base model.
        judges: The judges.
        target: The target attribute mix.
        generation: Images per prompt, DDIM steps, guidance scale, first seed, batch size.
        n_boot: Bootstrap resamples of each interval.
        grid_columns: Images per prompt in each method's grid.
        frechet_roles: Prompt roles whose images enter the Fréchet distance.
        title: Title of the report.
    """
    cfg = CompareConfig(
        methods=list(methods),
        prompts=list(prompts),
        backbone=backbone,
        judges=judges,
        target=target,
        generation=generation,
        n_boot=n_boot,
        grid_columns=grid_columns,
        frechet_roles=list(frechet_roles),
        title=title,
    )
    run_comparison(cfg, out)


# ============================================================================================= audit
def load_prompt_file(path: str | Path) -> list[PromptGroup]:
    """Prompt groups from a file.

    - a text file: one prompt per line (blank lines and lines starting with ``#`` skipped); each
      prompt is its own concept;
    - YAML or JSON: a list of prompts (as above); a list of prompt groups
      (``{name, role, template, values, concept}`` or ``{name, role, prompts: {concept: prompt}}``);
      ``{prompts: <either list>}``; or a mapping concept -> prompt (or -> list of prompts: the first
      is ``seen``, the others ``paraphrase``).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file holds no prompt or an unreadable structure.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    else:
        data = [
            line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")
        ]
    if isinstance(data, dict) and set(data) == {"prompts"}:
        data = data["prompts"]
    if not data:
        raise ValueError(f"prompts file {str(path)!r} holds no prompt")
    if isinstance(data, list) and all(isinstance(p, str) for p in data):
        return [PromptGroup(name="prompts", role="seen", prompts={p: p for p in data})]
    if isinstance(data, list) and all(isinstance(g, dict) for g in data):
        try:
            return [PromptGroup(**g) for g in data]
        except TypeError as e:
            raise ValueError(f"prompts file {str(path)!r}: bad prompt group: {e}") from e
    if isinstance(data, dict):
        lists = {str(c): ([p] if isinstance(p, str) else list(p)) for c, p in data.items()}
        if not all(isinstance(p, str) for ps in lists.values() for p in ps):
            raise ValueError(f"prompts file {str(path)!r}: map each concept to a prompt or a list of prompts")
        depth = max(len(ps) for ps in lists.values())
        groups = []
        for j in range(depth):
            prompts = {c: ps[j] for c, ps in lists.items() if len(ps) > j}
            role = "seen" if j == 0 else "paraphrase"
            groups.append(
                PromptGroup(name="prompts" if j == 0 else f"paraphrase-{j}", role=role, prompts=prompts)
            )
        return groups
    raise ValueError(
        f"prompts file {str(path)!r}: expected a list of prompts, a list of prompt groups, or a mapping "
        f"concept -> prompt; got {type(data).__name__}"
    )


def backbone_for_model(model: str, *, kind: Literal["auto", "tiny", "sd"] = "auto") -> BackboneConfig:
    """A backbone config for a model folder: a Stable Diffusion folder (``model_index.json``), a tiny
    backbone (``fairtune_backbone.json``) or the name of a shipped checkpoint.

    Raises:
        FileNotFoundError: ``kind='auto'`` and ``model`` is neither.
    """
    from fairtune.models._backbones import BACKBONE_FILE, resolve_shipped

    if kind == "auto":
        p = resolve_shipped(model)
        if (p / "model_index.json").is_file():
            kind = "sd"
        elif (p / BACKBONE_FILE).is_file():
            kind = "tiny"
        else:
            raise FileNotFoundError(
                f"model {model!r} is neither a Stable Diffusion folder (model_index.json), a fairtune tiny "
                f"backbone ({BACKBONE_FILE}) nor a shipped checkpoint; for a hub id pass --kind sd"
            )
    return BackboneConfig(kind=kind, pretrained=model)


def audit(
    *,
    model: str,
    prompts: Path,
    out: Path,
    adapter: Path | None = None,
    fuse: bool = True,
    kind: Literal["auto", "tiny", "sd"] = "auto",
    judges: JudgeConfig = JudgeConfig(),  # noqa: B008 - jsonargparse reads the default
    target: TargetConfig = TargetConfig(),  # noqa: B008
    generation: GenerationConfig = GenerationConfig(),  # noqa: B008
    n_boot: int = 1000,
    grid_columns: int = 8,
    name: str | None = None,
    progress: bool = True,
    backbone: Backbone | None = None,
    save_images: bool = True,
) -> dict:
    """Audit one model (optionally with a LoRA adapter): generate for PROMPTS, judge, and write
    OUT/metrics.json, OUT/report.md and OUT/report.html.

    Args:
        model: A Stable Diffusion folder, a tiny backbone folder or a shipped checkpoint name.
        prompts: A text file (one prompt per line) or YAML/JSON (prompts, prompt groups, or
            concept -> prompt).
        out: Output folder.
        adapter: A folder with pytorch_lora_weights.safetensors.
        fuse: Merge the adapter into the UNet weights.
        kind: Backbone kind; ``auto`` reads it from the folder.
        judges: The judges (ColoredDigits-Bias judges, or any attribute classifier).
        target: The target attribute mix.
        generation: Images per prompt, DDIM steps, guidance scale, first seed, batch size.
        n_boot: Bootstrap resamples of each interval.
        grid_columns: Images per prompt in the grid.
        name: The method's name in the report (default ``model`` or ``model+adapter``).
        progress: Show progress bars.
        backbone: The model, already loaded (``model`` then only names it in the report).
        save_images: Write every image to OUT/images/ (what ``fairtune review`` shows).

    Returns:
        The metrics written to ``metrics.json``.
    """
    method = MethodConfig(
        name=name or ("model+adapter" if adapter is not None else "model"),
        kind="adapter" if adapter is not None else "base",
        adapter=str(adapter) if adapter is not None else None,
        fuse=fuse,
    )
    groups = load_prompt_file(prompts)
    cfg = CompareConfig(
        methods=[method],
        prompts=groups,
        backbone=backbone.config if backbone is not None else backbone_for_model(model, kind=kind),
        judges=judges,
        target=target,
        generation=generation,
        n_boot=n_boot,
        grid_columns=grid_columns,
        frechet_roles=list(ROLES),
        title=f"fairtune audit: {model}" + (f" + {adapter}" if adapter is not None else ""),
    )
    return run_comparison(cfg, out, backbone=backbone, progress=progress, save_images=save_images)


def audit_command(
    *,
    model: str,
    prompts: Path,
    out: Path,
    adapter: Path | None = None,
    fuse: bool = True,
    kind: Literal["auto", "tiny", "sd"] = "auto",
    judges: JudgeConfig = JudgeConfig(),  # noqa: B008 - jsonargparse reads the default
    target: TargetConfig = TargetConfig(),  # noqa: B008
    generation: GenerationConfig = GenerationConfig(),  # noqa: B008
    n_boot: int = 1000,
    grid_columns: int = 8,
    name: str | None = None,
    save_images: bool = True,
) -> None:
    """Audit one model (optionally with a LoRA adapter) on PROMPTS; write OUT/metrics.json and a report.

    Judged attribute shares per concept with intervals; fidelity and Fréchet distance where the
    judges allow (a concept judge, reference images), "n/a" otherwise.

    Args:
        model: A Stable Diffusion folder, a tiny backbone folder or a shipped checkpoint name.
        prompts: A text file (one prompt per line) or YAML/JSON (prompts, prompt groups, or
            concept -> prompt).
        out: Output folder.
        adapter: A folder with pytorch_lora_weights.safetensors.
        fuse: Merge the adapter into the UNet weights.
        kind: Backbone kind; ``auto`` reads it from the folder.
        judges: The judges (ColoredDigits-Bias judges, or any attribute classifier).
        target: The target attribute mix.
        generation: Images per prompt, DDIM steps, guidance scale, first seed, batch size.
        n_boot: Bootstrap resamples of each interval.
        grid_columns: Images per prompt in the grid.
        name: The method's name in the report.
        save_images: Write every image to OUT/images/ (what ``fairtune review`` shows).
    """
    audit(
        model=model, prompts=prompts, out=out, adapter=adapter, fuse=fuse, kind=kind, judges=judges,
        target=target, generation=generation, n_boot=n_boot, grid_columns=grid_columns, name=name,
        save_images=save_images,
    )  # fmt: skip
