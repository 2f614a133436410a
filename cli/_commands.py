"""``fairtune compare``, ``audit`` and ``dial``: typed entry points whose signatures are the options."""

from __future__ import annotations

import inspect
import typing
from dataclasses import fields
from pathlib import Path
from typing import Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from fairtune.data import TargetConfig
from fairtune.eval import (
    CompareConfig,
    GenerationConfig,
    JudgeConfig,
    MethodConfig,
    PromptGroup,
    audit,
    dial,
    run_comparison,
)
from fairtune.models import BackboneConfig


def compare_command(
    *,
    out: Path,
    methods: list[MethodConfig],
    prompts: list[PromptGroup],
    backbone: BackboneConfig,
    judges: JudgeConfig = JudgeConfig(),
    target: TargetConfig = TargetConfig(),
    generation: GenerationConfig = GenerationConfig(),
    grid_columns: int = 8,
    frechet_roles: list[Literal["seen", "named", "heldout", "paraphrase", "explicit"]] = ["seen", "heldout"],
    title: str = "fairtune compare",
    update_model_card: bool = False,
    sampling_boot: int = 0,
) -> None:
    """Compare methods on the same prompts, seeds and judges; write OUT/metrics.json and a report.

    Methods: the base model, LoRA adapters, Fair Diffusion, prompt augmentation. The report is
    OUT/report.md (PNGs beside it) and a self-contained OUT/report.html.

    Args:
        out: Output folder.
        methods: The methods, each {name, kind, adapter, fuse, fair_diffusion, prompt_augmentation}.
        prompts: Prompt groups, each {name, role (seen|named|heldout|paraphrase|explicit), template,
            values, concept, names (the class an explicit group names)}.
        backbone: The base model.
        judges: The judges.
        target: The target attribute mix.
        generation: Images per prompt, DDIM steps, guidance scale, first seed, batch size.
        grid_columns: Images per prompt in each method's grid.
        frechet_roles: Prompt roles whose images enter the Fréchet distance.
        title: Title of the report.
        update_model_card: Also write each adapter's figures into its own model card (by default
            they go to OUT/model_card_<method>.md and the adapter folder is left as it is).
        sampling_boot: Resamples of each method's images for every summary figure's sampling spread
            (summary.sampling_sd); 0: not computed.
    """
    options = locals()
    run_comparison(CompareConfig(**{f.name: options[f.name] for f in fields(CompareConfig)}), out)


def audit_command(**options) -> None:
    """The command's options are :func:`fairtune.eval.audit`'s, but for ``backbone`` and ``progress``
    (Python-only: an already loaded model, progress bars)."""
    audit(**options)


def dial_command(**options) -> None:
    """The command's options are :func:`fairtune.eval.dial`'s, but for ``backbone`` and ``progress``."""
    dial(**options)


def _options_of(command, function) -> None:
    """Give ``command`` the signature (the option schema) and help of ``function``, less its
    Python-only parameters (``backbone``: an already loaded model; ``progress``: progress bars)."""
    hints = typing.get_type_hints(function)
    command.__signature__ = inspect.signature(function).replace(
        parameters=[
            p.replace(annotation=hints[p.name])
            for p in inspect.signature(function).parameters.values()
            if p.name not in ("backbone", "progress")
        ],
        return_annotation=None,
    )
    command.__doc__ = function.__doc__


_options_of(audit_command, audit)
_options_of(dial_command, dial)


def load_compare_config(path: str | Path, *args: str) -> CompareConfig:
    """A comparison config from a YAML file that ``fairtune compare --config`` reads (plus any
    ``--key value`` overrides), parsed and validated by the same parser as the command."""
    parser = ArgumentParser(prog="fairtune compare", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(compare_command, as_group=False)
    ns = parser.instantiate_classes(parser.parse_args(["--config", str(path), "--out", ".", *args]))
    return CompareConfig(**{f.name: ns[f.name] for f in fields(CompareConfig)})
