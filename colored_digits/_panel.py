"""ColoredDigits-Bias' judges as a :class:`~fairtune.eval.JudgePanel`, registered through the core's
``judges.kind: panel`` extension point (``judges.panel: fairtune.colored_digits:judge_panel``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from fairtune.data import GROUP_SEP
from fairtune.eval import JudgeConfig, JudgePanel, load_reference_images

from ._data import concept_name
from ._judges import Judges, load_judges

PANEL = "fairtune.colored_digits:judge_panel"


def judge_config(
    path: str | Path,
    *,
    color_judge: Literal["hue", "cnn"] = "hue",
    reference: str | Path | None = None,
    **fields,
) -> JudgeConfig:
    """The :class:`~fairtune.eval.JudgeConfig` of the ColoredDigits-Bias judges in ``path`` (a
    ``fairtune judges train`` folder); ``reference``: a data folder for the Fréchet distance; other
    ``JudgeConfig`` fields as keywords."""
    return JudgeConfig(
        kind="panel",
        panel=PANEL,
        options={"path": str(path), "color_judge": color_judge},
        reference=None if reference is None else str(reference),
        **fields,
    )


def judge_panel(cfg: JudgeConfig, *, image_size: int | None = None) -> JudgePanel:
    """The panel of ``judges.kind: panel`` with ``judges.options: {path, color_judge}``: the judges
    folder (``judges.json``) and the colour judge (``hue``, exact on the benchmark, or ``cnn``).

    Raises:
        FileNotFoundError: The judges folder or the reference folder is missing.
        ValueError: An unknown option, or judges trained at another image size.
    """
    options = dict(cfg.options or {})
    unknown = set(options) - {"path", "color_judge"}
    if unknown:
        raise ValueError(f"judges.options has unknown keys {sorted(unknown)}; known: ['color_judge', 'path']")
    path = options.get("path")
    if not path:
        raise ValueError("judges.options.path is not set: a `fairtune judges train` folder")
    color_judge = options.get("color_judge", "hue")
    if color_judge not in ("hue", "cnn"):
        raise ValueError(f"judges.options.color_judge must be 'hue' or 'cnn', got {color_judge!r}")
    judges = load_judges(path)
    size = judges.report.get("image_size")
    if image_size is not None and size is not None and int(size) != int(image_size):
        raise ValueError(
            f"the judges in {path} were trained on {size}x{size} images but the model "
            f"generates {image_size}x{image_size}"
        )
    reference = None
    if cfg.reference is not None:
        reference = load_reference_images(cfg.reference, n=cfg.n_reference, image_size=image_size)
    return colored_digits_panel(
        judges, color_judge=color_judge, reference=reference, batch_size=cfg.batch_size, source=str(path)
    )


def colored_digits_panel(
    judges: Judges,
    *,
    color_judge: str = "hue",
    reference: torch.Tensor | None = None,
    batch_size: int = 512,
    source: str = "",
    attributes: Sequence[str] = ("color",),
) -> JudgePanel:
    """The ColoredDigits-Bias judges as a panel: colour by the hue or CNN judge, fidelity by the digit
    CNN, Fréchet features from its penultimate layer.

    ``attributes`` names what is judged: ``["color"]``, or a joint such as ``["color", "background"]``
    whose labels are the joint groups (``"red+dark"``, in :class:`~fairtune.data.Target` order) and
    whose panel attribute is ``"color+background"``."""
    attributes = list(attributes)
    bg = " and background by median brightness" if "background" in attributes else ""
    return JudgePanel(
        attribute=GROUP_SEP.join(attributes),
        classes=judges.groups(attributes),
        attribute_fn=lambda x: judges.label(x, attributes, judge=color_judge),
        concept_classes=[concept_name(d) for d in range(10)],
        concept_fn=judges.digit,
        feature_fn=judges.features,
        reference=reference,
        description=(
            f"ColoredDigits-Bias judges from `{source}`: colour by the {color_judge} judge{bg}, "
            "fidelity by the digit CNN, Fréchet distance on its 64-d features"
            + (f" against {len(reference)} held-out real images" if reference is not None else "")
        ),
        batch_size=batch_size,
        image_size=judges.report.get("image_size"),
    )
