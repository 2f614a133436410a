"""The record and the target (DESIGN §3), with the validation every source and sampler relies on."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from PIL import Image

SUM_TOLERANCE = 1e-6
GROUP_SEP = "+"


class SchemaError(ValueError):
    """Raised for a record, column, attribute class or target that breaks the schema."""


@dataclass
class Record:
    """One training or evaluation example.

    Attributes:
        image: The RGB image.
        prompt: The caption the model is conditioned on.
        concept: What bias is measured per (e.g. ``"doctor"`` or ``"digit 3"``).
        attributes: Attribute name to class label, or ``None`` where the label is unknown.
    """

    image: Image.Image
    prompt: str
    concept: str
    attributes: dict[str, str | None] = field(default_factory=dict)


@dataclass
class AttributeSpec:
    """The protected attributes of a data set and their declared classes.

    Attributes:
        classes: Attribute name to the ordered list of its class labels, e.g.
            ``{"color": ["red", "blue"]}``. Class indices follow this order everywhere.
    """

    classes: dict[str, list[str]]

    def __post_init__(self) -> None:
        if not self.classes:
            raise SchemaError("AttributeSpec needs at least one attribute")
        for name, labels in self.classes.items():
            if len(labels) < 2:
                raise SchemaError(f"attribute {name!r} needs at least two classes, got {labels}")
            if len(set(labels)) != len(labels):
                raise SchemaError(f"attribute {name!r} declares a class twice: {labels}")
            if any(GROUP_SEP in c for c in labels):
                raise SchemaError(f"class names of {name!r} may not contain {GROUP_SEP!r}")

    @property
    def names(self) -> list[str]:
        return list(self.classes)

    def check_label(self, name: str, label: Any) -> str | None:
        """Return ``label`` as a declared class of ``name`` (or None for unknown); raise otherwise."""
        if name not in self.classes:
            raise SchemaError(f"unknown attribute {name!r}; declared: {self.names}")
        if label is None or (isinstance(label, float) and math.isnan(label)) or label == "":
            return None
        label = str(label)
        if label not in self.classes[name]:
            raise SchemaError(
                f"attribute {name!r} has class {label!r}, which is not declared; "
                f"declared classes: {self.classes[name]}"
            )
        return label

    def index(self, name: str, label: str | None) -> int:
        """Class index of ``label`` for attribute ``name``; -1 for unknown."""
        return -1 if label is None else self.classes[name].index(label)


def validate_record(record: Record, spec: AttributeSpec) -> Record:
    """Check a record against ``spec``; returns it with labels normalised to declared classes."""
    if not isinstance(record.image, Image.Image):
        raise SchemaError(f"record image must be a PIL image, got {type(record.image).__name__}")
    if not isinstance(record.prompt, str):
        raise SchemaError(f"record prompt must be a string, got {type(record.prompt).__name__}")
    if not isinstance(record.concept, str) or not record.concept:
        raise SchemaError(f"record concept must be a non-empty string, got {record.concept!r}")
    attrs = {}
    for name in spec.names:
        attrs[name] = spec.check_label(name, record.attributes.get(name))
    extra = set(record.attributes) - set(spec.names)
    if extra:
        raise SchemaError(f"record has undeclared attributes {sorted(extra)}; declared: {spec.names}")
    record.attributes = attrs
    if record.image.mode != "RGB":
        record.image = record.image.convert("RGB")
    return record


@dataclass
class TargetConfig:
    """The mix the model's outputs should follow, over one attribute or a joint of several.

    Attributes:
        attributes: The attribute(s) the target is over; several make a joint (intersectional)
            target whose groups are written ``"red+dark"`` (classes in this order, joined by ``+``).
            ``None``: the one attribute the data (or the judges) declare; with several declared,
            naming them is required.
        proportions: ``"uniform"`` or group name to proportion (must sum to 1).
        per_concept: Optional concept to proportions (``"uniform"`` or a dict) overriding
            ``proportions`` for that concept.
    """

    attributes: list[str] | None = None
    proportions: Literal["uniform"] | dict[str, float] = "uniform"
    per_concept: dict[str, Literal["uniform"] | dict[str, float]] | None = None


class Target:
    """A validated target: group names, and a proportion vector per concept.

    Args:
        config: The target as configured.
        spec: The attribute classes of the data.
    """

    def __init__(self, config: TargetConfig, spec: AttributeSpec) -> None:
        if isinstance(config, Mapping):
            config = TargetConfig(**config)
        if config.attributes is None:
            if len(spec.names) != 1:
                raise SchemaError(
                    f"target.attributes is not set and the data declares {len(spec.names)} attributes "
                    f"{spec.names}: name the target's (one, or several for a joint target)"
                )
            config = replace(config, attributes=list(spec.names))
        if not config.attributes:
            raise SchemaError("target.attributes is empty: name at least one attribute")
        for name in config.attributes:
            if name not in spec.classes:
                raise SchemaError(f"target attribute {name!r} is not declared; declared: {spec.names}")
        self.config = config
        self.spec = spec
        self.attributes = list(config.attributes)
        self.groups: list[str] = [
            GROUP_SEP.join(combo) for combo in itertools.product(*(spec.classes[a] for a in self.attributes))
        ]
        self.default = self._vector(config.proportions, where="target.proportions")
        self.per_concept = {
            concept: self._vector(p, where=f"target.per_concept[{concept!r}]")
            for concept, p in (config.per_concept or {}).items()
        }

    def _vector(self, proportions: str | Mapping[str, float], *, where: str) -> list[float]:
        k = len(self.groups)
        if isinstance(proportions, str):
            if proportions != "uniform":
                raise SchemaError(f"{where} must be 'uniform' or a mapping, got {proportions!r}")
            return [1.0 / k] * k
        unknown = set(proportions) - set(self.groups)
        if unknown:
            raise SchemaError(
                f"{where} names groups {sorted(unknown)} that do not exist; groups: {self.groups}"
            )
        vec = [float(proportions.get(g, 0.0)) for g in self.groups]
        if not all(math.isfinite(v) for v in vec):
            raise SchemaError(
                f"{where} has a proportion that is not a finite number: {dict(zip(self.groups, vec))}"
            )
        if any(v < 0 for v in vec):
            raise SchemaError(f"{where} has a negative proportion: {dict(zip(self.groups, vec))}")
        total = sum(vec)
        if abs(total - 1.0) > SUM_TOLERANCE:
            raise SchemaError(f"{where} proportions sum to {total:.8g}, not 1 (tolerance 1e-6)")
        return vec

    def proportions(self, concept: str | None = None) -> list[float]:
        """The target proportion vector (over ``self.groups``) for ``concept``."""
        return list(self.per_concept.get(concept, self.default))

    def group_of(self, attributes: Mapping[str, str | None]) -> int:
        """Index in ``self.groups`` of a record's attribute labels; -1 if any label is unknown."""
        labels = [attributes.get(a) for a in self.attributes]
        if any(label is None for label in labels):
            return -1
        return self.groups.index(GROUP_SEP.join(labels))  # type: ignore[arg-type]

    def check_coverage(self, concepts: Sequence[str], groups: Sequence[int]) -> None:
        """Raise if some concept has no record of a group whose target proportion is positive.

        Args:
            concepts: The concept of each record.
            groups: The group index of each record (-1 for unknown).
        """
        present: dict[str, set[int]] = {}
        for c, g in zip(concepts, groups):
            present.setdefault(c, set()).add(g)
        for concept in sorted(present):
            for gi, q in enumerate(self.proportions(concept)):
                if q > 0 and gi not in present[concept]:
                    raise SchemaError(
                        f"target group {self.groups[gi]!r} has proportion {q:g} for concept "
                        f"{concept!r}, but that concept has no record of the group"
                    )
