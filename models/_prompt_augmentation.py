"""Drawing a class per image from the target mix, and prompt augmentation (DESIGN §5).

- **Prompt augmentation**: the attribute word of a class drawn per image is written into the prompt
  (``"a handwritten digit 3"`` -> ``"a red handwritten digit 3"``). Cost: that of the base model.

Fair Diffusion (``_baselines``) draws its classes with the same :func:`draw_classes`, so for the same
prompts, target, assignment and seed both baselines assign the same class to each image.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

ASSIGNMENTS = ("random", "stratified")
METHODS = ("base", "adapter", "prompt_augmentation", "fair_diffusion", "class_adapters")


# --------------------------------------------------------------------------------------------- target
def _check_target(target: dict[str, float], *, classes: Sequence[str] | None = None, what: str = "") -> None:
    """Raise ``ValueError`` unless ``target`` is a probability over (exactly) ``classes``."""
    if not isinstance(target, dict) or not target:
        raise ValueError(f"target must be a non-empty dict class -> probability, got {target!r}")
    for k, p in target.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"target class names must be non-empty strings, got {k!r}")
        if not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
            raise ValueError(f"target probability of {k!r} must be a finite number >= 0, got {p!r}")
    total = float(sum(target.values()))
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"target probabilities must sum to 1, got {total:.6g} for {target}")
    if classes is not None and set(target) != set(classes):
        raise ValueError(
            f"target classes {sorted(target)} must equal the {what} classes {sorted(classes)} "
            f"(missing: {sorted(set(classes) - set(target))}, unknown: {sorted(set(target) - set(classes))})"
        )


def _check_assignment(assignment: str) -> None:
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")


def _stratified_counts(n: int, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Counts summing to ``n`` closest to ``n * p`` (largest remainder; ties broken at random)."""
    raw = n * p
    counts = np.floor(raw + 1e-9).astype(np.int64)
    frac = np.round(raw - counts, 9)
    left = n - int(counts.sum())
    if left > 0:
        order = np.lexsort((rng.random(len(p)), -frac))  # largest remainder first, random among ties
        counts[order[:left]] += 1
    return counts


def draw_classes(
    n_or_keys: int | Sequence[str],
    *,
    target: dict[str, float],
    assignment: Literal["random", "stratified"] = "random",
    seed: int = 0,
) -> list[str]:
    """Draw one class per image from the target mix.

    Images are drawn in groups: all images form one group when ``n_or_keys`` is a count; when it is
    one key per image (e.g. the prompt), images with the same key form a group, and each group is drawn
    from its own generator (seeded by ``seed`` and the key), so a group's classes do not depend on
    which other groups are drawn with it.

    Args:
        n_or_keys: Number of images, or one group key per image.
        target: Class -> probability (>= 0, summing to 1); its order is the class order.
        assignment: ``"random"``: each image's class drawn independently from the mix.
            ``"stratified"``: per group, counts as close to ``n_group * p`` as integers allow (exact
            when those are integers; remainders go to the largest fractions, ties at random), in a
            random order.
        seed: Seed of the draw.

    Returns:
        The class of each image, in order.

    Raises:
        ValueError: On a bad target, count or assignment.
    """
    _check_target(target)
    _check_assignment(assignment)
    if isinstance(n_or_keys, (int, np.integer)) and not isinstance(n_or_keys, bool):
        if n_or_keys < 0:
            raise ValueError(f"number of images must be >= 0, got {n_or_keys}")
        keys: list[str] = [""] * int(n_or_keys)
    elif isinstance(n_or_keys, Sequence) and not isinstance(n_or_keys, str):
        keys = [str(k) for k in n_or_keys]
    else:
        raise ValueError(f"n_or_keys must be an int or a sequence of keys, got {n_or_keys!r}")
    names = list(target)
    p = np.array([target[k] for k in names], dtype=np.float64)
    p = p / p.sum()
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    out = [""] * len(keys)
    for key, idx in groups.items():
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode("utf-8"))])
        if assignment == "random":
            drawn = rng.choice(len(names), size=len(idx), p=p)
        else:
            drawn = rng.permutation(np.repeat(np.arange(len(names)), _stratified_counts(len(idx), p, rng)))
        for i, c in zip(idx, drawn):
            out[i] = names[int(c)]
    return out


def unet_evals_per_image(method: str, *, steps: int, n_edits: int = 0) -> int:
    """UNet evaluations (one image through the UNet once) each method spends per image.

    ``base``, ``adapter`` (fused or not), ``class_adapters`` (one fused adapter per image) and
    ``prompt_augmentation``: unconditional + conditional per step, ``2 * steps``. ``fair_diffusion``:
    one more per edit prompt, ``(2 + n_edits) * steps``.

    Raises:
        ValueError: On an unknown method or a negative count.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps < 0 or n_edits < 0:
        raise ValueError(f"steps and n_edits must be >= 0, got steps={steps}, n_edits={n_edits}")
    if method == "fair_diffusion":
        if n_edits < 1:
            raise ValueError("fair_diffusion needs n_edits >= 1 (one per attribute class)")
        return (2 + n_edits) * steps
    return 2 * steps


# ------------------------------------------------------------------------------------ SEGA guidance
def _check_prompts(prompts: list[str], seeds: list[int] | None = None) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"prompts must be non-empty strings, got {bad[:3]!r}")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per prompt")


# ------------------------------------------------------------------------------- prompt augmentation
_ARTICLE = re.compile(r"^(a|an|the)\s+(.+)$", re.IGNORECASE | re.DOTALL)


@dataclass
class PromptAugmentationConfig:
    """Prompt augmentation: the attribute word of the class drawn per image goes into its prompt.

    The rule: a prompt that starts with an article ``a``/``an``/``the`` gets the word right after it
    (``"a handwritten digit 3"`` -> ``"a red handwritten digit 3"``; ``a``/``an`` follow the word's first
    letter: ``"a photo"`` + ``"old"`` -> ``"an old photo"``); any other prompt gets it as a prefix
    (``"doctors at work"`` -> ``"female doctors at work"``). ``template`` places the pieces.

    Attributes:
        words: Class -> word inserted for it (e.g. ``{"red": "red", "blue": "blue"}``).
        template: Format of the augmented prompt with fields ``{article}`` (empty when the prompt has
            none), ``{word}`` and ``{rest}`` (the prompt after its article); runs of spaces collapse.
        assignment: How classes are drawn per image from the target mix (see :func:`draw_classes`).
        seed: Seed of the class draw.
    """

    words: dict[str, str]
    template: str = "{article} {word} {rest}"
    assignment: Literal["random", "stratified"] = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.words, dict) or not self.words:
            raise ValueError(f"words must be a non-empty dict class -> word, got {self.words!r}")
        for k, v in self.words.items():
            if not isinstance(k, str) or not k or not isinstance(v, str) or not v.strip():
                raise ValueError(f"words needs non-empty class names and words, got {k!r}: {v!r}")
        if "{word}" not in self.template or "{rest}" not in self.template:
            raise ValueError(f"template must contain {{word}} and {{rest}}, got {self.template!r}")
        try:
            self.template.format(article="a", word="w", rest="r")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"template {self.template!r} may only use the fields {{article}}, {{word}}, {{rest}}: {e}"
            ) from e
        _check_assignment(self.assignment)

    def apply(self, prompt: str, word: str) -> str:
        """``prompt`` with ``word`` inserted by the rule above."""
        text = " ".join(prompt.split())
        m = _ARTICLE.match(text)
        article, rest = (m.group(1), m.group(2)) if m else ("", text)
        if article.lower() in ("a", "an"):
            an = word.strip()[:1].lower() in "aeiou"
            article = ("an" if an else "a") if article.islower() else ("An" if an else "A")
        return " ".join(self.template.format(article=article, word=word.strip(), rest=rest).split())


def augment_prompts(
    prompts: list[str], *, config: PromptAugmentationConfig, target: dict[str, float]
) -> tuple[list[str], list[str]]:
    """Draw a class per prompt from ``target`` and write its word into the prompt.

    Classes are drawn by :func:`draw_classes` with the prompts as group keys (as
    :func:`fair_diffusion_sample` does), so both baselines give each image the same class.

    Args:
        prompts: One prompt per image.
        config: Words, template and draw.
        target: Class -> probability; its classes must be those of ``config.words``.

    Returns:
        The augmented prompts and the class drawn for each.

    Raises:
        ValueError: On empty prompts or a target that is not a probability over the words' classes.
    """
    _check_prompts(prompts)
    _check_target(target, classes=list(config.words), what="words")
    classes = draw_classes(list(prompts), target=target, assignment=config.assignment, seed=config.seed)
    return [config.apply(p, config.words[c]) for p, c in zip(prompts, classes)], classes
