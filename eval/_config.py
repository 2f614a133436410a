"""What a comparison or an audit is made of: prompt groups, methods, judges, and their validation.

Prompts come in groups with a role: ``seen`` (neutral prompts of concepts the adapter trained on),
``named`` (concepts its training named without images), ``heldout`` (concepts it never saw),
``paraphrase`` (wordings it never saw) and ``explicit`` (prompts naming a class, whose target is that
class).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fairtune.data import TargetConfig, read_prompt_data
from fairtune.models import (
    LORA_WEIGHT_NAME,
    BackboneConfig,
    ClassifierConfig,
    FairDiffusionConfig,
    PromptAugmentationConfig,
)

from ._clip_judge import ClipJudgeConfig
from ._generation import GenerationConfig
from ._scoring import ROLES

METHOD_KINDS = ("base", "adapter", "fair_diffusion", "prompt_augmentation", "class_adapters")


@dataclass
class PromptGroup:
    """A group of prompts with one role, one prompt per concept.

    Either ``template`` and ``values`` (``template`` and ``concept`` formatted with each value), or
    ``prompts`` (concept to prompt).

    Attributes:
        name: Unique name of the group; an entry of it is keyed ``"<name>/<concept>"``.
        role: ``seen`` (neutral prompts of concepts the adapter trained on), ``named`` (concepts its
            training named, e.g. as fairness-loss or distillation prompts, without images),
            ``heldout`` (concepts it never trained on), ``paraphrase`` (wordings it never trained
            on) or ``explicit`` (prompts that name a class: ``names`` says which, and that class is
            the target).
        template: Prompt with a ``{value}`` field, e.g. ``"a handwritten digit {value}"``.
        values: What ``{value}`` takes, one prompt each (e.g. the digits ``[0, 1, 2]``).
        concept: Concept name with a ``{value}`` field (``"digit {value}"``); a concept judge and a
            per-concept target look concepts up by this name.
        prompts: Concept to prompt, instead of ``template`` and ``values``.
        names: ``explicit`` role only: the class its prompts name (``"red"`` for ``"a red
            handwritten digit {value}"``).
    """

    name: str
    role: Literal["seen", "named", "heldout", "paraphrase", "explicit"] = "seen"
    template: str | None = None
    values: list[int | str] = field(default_factory=list)
    concept: str = "{value}"
    prompts: dict[str, str] | None = None
    names: str | None = None

    def entries(self) -> list[PromptEntry]:
        """The group's prompts, one :class:`PromptEntry` per concept.

        Raises:
            ValueError: When the group names no prompt, names both forms, or has a bad template.
        """
        if self.role not in ROLES:
            raise ValueError(f"prompt group {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if (self.role == "explicit") != (self.names is not None):
            raise ValueError(
                f"prompt group {self.name!r}: an explicit group names its class (names: <class>) and only "
                f"an explicit group does (role {self.role!r}, names {self.names!r})"
            )
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
                key=f"{self.name}/{c}",
                group=self.name,
                role=self.role,
                concept=str(c),
                prompt=str(p),
                names=self.names,
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
        names: The class an explicit prompt names (its target); ``None`` for a neutral prompt.
    """

    key: str
    group: str
    role: str
    concept: str
    prompt: str
    names: str | None = None


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
        adapter_scale: The adapter's weight, as diffusers sets it: ``set_adapters(...,
            adapter_weights=adapter_scale)`` unfused, ``fuse_lora(lora_scale=adapter_scale)`` fused.
            0 is the base model, 1 the adapter as trained, above 1 extrapolates (docs/dial.md). A
            ``class_adapters`` method scales every one of its adapters.
        fair_diffusion: ``fair_diffusion`` only: edit prompts per class and SEGA parameters.
        prompt_augmentation: ``prompt_augmentation`` only: the word per class.
        class_adapters: ``class_adapters`` only: class to an adapter folder trained toward that class
            alone; each image is generated with the adapter of a class drawn for it (stratified per
            prompt) from ``mix`` (docs/dial.md, "Any mix").
        mix: ``class_adapters`` only: concept (``"*"``: every other concept) to the share of images
            each class's adapter draws; ``None``: the comparison's target.
        route_named: ``class_adapters`` only: every image of a prompt that names exactly one class
            (its name as a word: ``"a red handwritten digit 9"`` names ``red``) comes from that
            class's adapter, whatever the mix; the mix is for prompts that name none. A user who asks
            for a class gets it at any requested mix.
    """

    name: str
    kind: Literal["base", "adapter", "fair_diffusion", "prompt_augmentation", "class_adapters"] = "base"
    adapter: str | None = None
    fuse: bool = True
    adapter_scale: float = 1.0
    fair_diffusion: FairDiffusionConfig | None = None
    prompt_augmentation: PromptAugmentationConfig | None = None
    class_adapters: dict[str, str] | None = None
    mix: dict[str, dict[str, float]] | None = None
    route_named: bool = False


@dataclass
class JudgeConfig:
    """The judges that score generated images (never a model used in training).

    Attributes:
        kind: Required. ``panel``: a judge panel of one's own, built by ``panel`` (a benchmark's
            judges, e.g. ColoredDigits-Bias'). ``classifier``: any attribute classifier module with
            safetensors weights (e.g. for Stable Diffusion). ``clip``: a CLIP judge (``clip``:
            zero-shot prompts per class, or a trained probe).
        panel: ``panel``: ``module:function`` called as ``function(judges_config, image_size=...)``,
            returning a :class:`~fairtune.eval.JudgePanel` (ColoredDigits-Bias:
            ``fairtune.colored_digits:judge_panel``).
        options: ``panel``: the panel's own settings, read by its function (ColoredDigits-Bias:
            ``path``, the judges folder, and ``color_judge``, ``hue`` or ``cnn``).
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
        reference: Real images for the Fréchet distance: a data folder with a ``table/`` (its
            held-out split) or a folder of image files; ``None``: no Fréchet distance.
        n_reference: Reference images used (a seeded random subset).
        batch_size: Images per judge batch.
        clip: ``clip``: the CLIP judge (``attribute`` and ``classes`` name what it judges); its image
            embeddings also feed the Fréchet distance.
        second: A second, independent CLIP judge of the same attribute and classes: its agreement
            with the first (raw and Cohen's kappa) is reported, per prompt and overall.
        calibration: Labelled held-out images (imagefolder with ``metadata.jsonl`` or a table with a
            column named ``attribute``), never trained on: each judge's confusion matrix is measured
            on them and the judged shares are corrected for the first judge's error.
        calibration_split: The split of ``calibration`` to read; ``None``: its only split (a folder
            with several is refused: name the held-out one, never the one the judge trained on).
        n_calibration: At most this many calibration images (a seeded random subset).
        correction_boot: Bootstrap replicates of each corrected interval.
        change_features: A CLIP folder whose image embeddings give the same-seed change score of each
            method against the ``base`` method; ``None``: the ``clip`` judge's own, if any.
    """

    kind: Literal["panel", "classifier", "clip"] | None = None
    panel: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    attribute: str | None = None
    classes: list[str] | None = None
    classifier: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(weights=""))
    min_confidence: float = 0.0
    concept_classifier: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(weights=""))
    concept_classes: list[str] | None = None
    reference: str | None = None
    n_reference: int = 2000
    batch_size: int = 512
    clip: ClipJudgeConfig = field(default_factory=ClipJudgeConfig)
    second: ClipJudgeConfig | None = None
    calibration: str | None = None
    calibration_split: str | None = None
    n_calibration: int = 2000
    correction_boot: int = 1000
    change_features: str | None = None


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
        grid_columns: Images per prompt shown in each method's image grid.
        frechet_roles: Prompt roles whose images enter the Fréchet distance (the neutral prompts of
            every concept by default, matching the reference set's concept mix).
        title: Title of the report.
        update_model_card: Also write the figures into each adapter's own model card (its
            ``README.md``). By default the card section goes to ``OUT/model_card_<method>.md`` and
            the adapter folder, an input, is left as it is.
        sampling_boot: Resamples of each method's images (within each prompt and drawn class) for
            the sampling spread of every summary figure (``summary.sampling_sd``, see
            :func:`fairtune.eval.sampling_sd`); 0: not computed.
    """

    methods: list[MethodConfig]
    prompts: list[PromptGroup]
    backbone: BackboneConfig
    judges: JudgeConfig = field(default_factory=JudgeConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    grid_columns: int = 8
    frechet_roles: list[Literal["seen", "named", "heldout", "paraphrase", "explicit"]] = field(
        default_factory=lambda: ["seen", "heldout"]
    )
    title: str = "fairtune compare"
    update_model_card: bool = False
    sampling_boot: int = 0


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
        if not math.isfinite(m.adapter_scale):
            raise ValueError(f"method {m.name!r}: adapter_scale must be finite, got {m.adapter_scale}")
        if m.adapter is None and m.class_adapters is None and m.adapter_scale != 1.0:
            raise ValueError(f"method {m.name!r}: adapter_scale={m.adapter_scale} but no adapter to scale")
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
        if (m.kind == "class_adapters") != (m.class_adapters is not None) or (
            (m.mix is not None or m.route_named) and m.kind != "class_adapters"
        ):
            raise ValueError(
                f"method {m.name!r}: a class_adapters method names its adapters (class_adapters: "
                "{red: DIR, blue: DIR}), and only it does (and only it takes a mix)"
            )
        if m.kind == "class_adapters" and m.adapter is not None:
            raise ValueError(f"method {m.name!r}: a class_adapters method takes class_adapters, not adapter")
        for cls, folder in (m.class_adapters or {}).items():
            if not (Path(folder) / LORA_WEIGHT_NAME).is_file():
                raise FileNotFoundError(
                    f"method {m.name!r}: class_adapters[{cls!r}] = {folder!r} has no {LORA_WEIGHT_NAME}"
                )


def _check_baseline_classes(methods: Sequence[MethodConfig], classes: list[str]) -> None:
    for m in methods:
        if m.class_adapters is not None:
            _check_mix(m, classes)
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


def _check_mix(m: MethodConfig, classes: list[str]) -> None:
    if set(m.class_adapters) != set(classes):
        raise ValueError(
            f"method {m.name!r}: class_adapters names classes {sorted(m.class_adapters)} but the judged "
            f"classes are {classes}"
        )
    for concept, w in (m.mix or {}).items():
        if set(w) != set(classes) or any(not 0 <= float(x) <= 1 for x in w.values()):
            raise ValueError(
                f"method {m.name!r}: mix[{concept!r}] must give a share in [0, 1] to each of {classes}"
            )
        if abs(sum(w.values()) - 1.0) > 1e-6:
            raise ValueError(f"method {m.name!r}: mix[{concept!r}] must sum to 1, got {sum(w.values()):.4f}")


def groups_for(groups: Sequence[PromptGroup], concepts: set[str]) -> list[PromptGroup]:
    """The prompt groups cut to the prompts of ``concepts`` (group names kept, so keys match)."""
    out = []
    for g in groups:
        kept = {e.concept: e.prompt for e in g.entries() if e.concept in concepts}
        if kept:
            out.append(PromptGroup(name=g.name, role=g.role, names=g.names, prompts=kept))
    return out


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
    data = read_prompt_data(path)
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
