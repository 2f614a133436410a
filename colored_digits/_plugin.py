"""The benchmark's command plugin, registered under the ``fairtune.commands`` entry point
(pyproject.toml): light at import, so ``fairtune --help`` lists its commands without loading torch."""

from __future__ import annotations

# One line per top-level command this plugin adds (``fairtune --help``).
HELP = {
    "demo": "The main job: train the class adapters, compare them with the base model and the baselines.",
    "judges": "Train the benchmark's judges (never used by training).",
}


def commands() -> dict:
    """This plugin's part of the subcommand table (``data`` and ``classifier`` merge into the core's)."""
    from ._commands import classifier_train, colored_digits, judges_train
    from ._demo import demo

    return {
        "demo": demo,
        "data": {"colored-digits": colored_digits},
        "judges": {"_help": HELP["judges"], "train": judges_train},
        "classifier": {"train": classifier_train},
    }
