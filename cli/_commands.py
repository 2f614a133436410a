"""``fairtune compare`` and ``fairtune audit``: typed entry points whose signatures are the options."""

from __future__ import annotations

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
    run_comparison,
)
from fairtune.models import BackboneConfig


def _default_backbone() -> BackboneConfig:
    return BackboneConfig(kind="tiny", pretrained="colored-digits-16")


def compare_command(
    *,
    out: Path,
    methods: list[MethodConfig],
    prompts: list[PromptGroup],
    backbone: BackboneConfig = _default_backbone(),
    judges: JudgeConfig = JudgeConfig(),
    target: TargetConfig = TargetConfig(),
    generation: GenerationConfig = GenerationConfig(),
    n_boot: int = 1000,
    grid_columns: int = 8,
    frechet_roles: list[Literal["seen", "heldout", "paraphrase"]] = ["seen", "heldout"],
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
        n_boot: Unused (intervals are exact, docs/metrics.md); kept so older configs still run.
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


def audit_command(
    *,
    model: str,
    prompts: Path,
    out: Path,
    adapter: Path | None = None,
    fuse: bool = True,
    kind: Literal["auto", "tiny", "sd"] = "auto",
    judges: JudgeConfig = JudgeConfig(),
    target: TargetConfig = TargetConfig(),
    generation: GenerationConfig = GenerationConfig(),
    n_boot: int = 1000,
    grid_columns: int = 8,
    name: str | None = None,
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
        n_boot: Unused (intervals are exact, docs/metrics.md); kept so older configs still run.
        grid_columns: Images per prompt in the grid.
        name: The method's name in the report.
    """
    audit(
        model=model, prompts=prompts, out=out, adapter=adapter, fuse=fuse, kind=kind, judges=judges,
        target=target, generation=generation, n_boot=n_boot, grid_columns=grid_columns, name=name,
    )  # fmt: skip


def load_compare_config(path: str | Path, *args: str) -> CompareConfig:
    """A comparison config from a YAML file that ``fairtune compare --config`` reads (plus any
    ``--key value`` overrides), parsed and validated by the same parser as the command."""
    parser = ArgumentParser(prog="fairtune compare", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(compare_command, as_group=False)
    ns = parser.instantiate_classes(parser.parse_args(["--config", str(path), "--out", ".", *args]))
    return CompareConfig(
        methods=list(ns.methods),
        prompts=list(ns.prompts),
        backbone=ns.backbone,
        judges=ns.judges,
        target=ns.target,
        generation=ns.generation,
        n_boot=ns.n_boot,
        grid_columns=ns.grid_columns,
        frechet_roles=list(ns.frechet_roles),
        title=ns.title,
    )
