"""ColoredDigits-Bias, the embedded benchmark, as a tenant above the core: its data renderer and ink
helpers, judges, small CNN, the judge panel and the sweep judge it registers through the core's
extension points, the demo and its commands.

The core (``fairtune.data``, ``models``, ``train``, ``eval``, ``cli``) never imports this package
(tests/test_imports.py): it plugs in the way a user's own attribute would, through
``judges.kind: panel`` (``judges.panel: fairtune.colored_digits:judge_panel``), a sweep spec's
``judge.function`` (``fairtune.colored_digits:judge_colored_digits``), a ``module`` path for the
classifiers (``fairtune.colored_digits.SmallCNN``) and the ``fairtune.commands`` entry point for its
commands (``fairtune demo``, ``fairtune data colored-digits``, ``fairtune judges train``,
``fairtune classifier train``).

Names load on first use (``fairtune.data.lazy_facade``).
"""

from __future__ import annotations

from fairtune.data import lazy_facade

# name -> (submodule, attribute): the public facade
_EXPORTS = {
    "BACKGROUND": ("._data", "BACKGROUND"),
    "DEFAULT_RED_SHARE": ("._data", "DEFAULT_RED_SHARE"),
    "INK": ("._data", "INK"),
    "ColoredDigitsConfig": ("._data", "ColoredDigitsConfig"),
    "InkMap": ("._data", "InkMap"),
    "concept_name": ("._data", "concept_name"),
    "explicit_prompt": ("._data", "explicit_prompt"),
    "ink_alpha": ("._data", "ink_alpha"),
    "ink_hue": ("._data", "ink_hue"),
    "ink_map": ("._data", "ink_map"),
    "mixed_ink": ("._data", "mixed_ink"),
    "neutral_prompt": ("._data", "neutral_prompt"),
    "perturb": ("._data", "perturb"),
    "random_shift": ("._data", "random_shift"),
    "render": ("._data", "render"),
    "rgb_to_hue_chroma": ("._data", "rgb_to_hue_chroma"),
    "build_colored_digits": ("._data", "build"),
    "generate_colored_digits": ("._data", "generate"),
    "CNNTrainConfig": ("._cnn", "CNNTrainConfig"),
    "SmallCNN": ("._cnn", "SmallCNN"),
    "train_cnn": ("._cnn", "train_cnn"),
    "train_attribute_classifier": ("._cnn", "train_attribute_classifier"),
    "BackgroundJudge": ("._judges", "BackgroundJudge"),
    "HueJudge": ("._judges", "HueJudge"),
    "Judges": ("._judges", "Judges"),
    "JudgeTrainConfig": ("._judges", "JudgeTrainConfig"),
    "load_judges": ("._judges", "load_judges"),
    "train_judges": ("._judges", "train_judges"),
    "colored_digits_panel": ("._panel", "colored_digits_panel"),
    "judge_config": ("._panel", "judge_config"),
    "judge_panel": ("._panel", "judge_panel"),
    "colored_digits_prompts": ("._benchmark", "colored_digits_prompts"),
    "digit_entries": ("._benchmark", "digit_entries"),
    "evaluate_backbone_on_digits": ("._benchmark", "evaluate_backbone_on_digits"),
    "judge_colored_digits": ("._benchmark", "judge_colored_digits"),
    "judge_digit_images": ("._benchmark", "judge_digit_images"),
    "load_benchmark_judges": ("._benchmark", "load_benchmark_judges"),
    "demo": ("._demo", "demo"),
    "demo_compare_config": ("._demo", "demo_compare_config"),
    "prepare_assets": ("._demo", "prepare_assets"),
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_facade(__name__, _EXPORTS, globals())
