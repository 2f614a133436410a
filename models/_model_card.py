"""The adapter folder's model card (``README.md``), as diffusers' training scripts write one.

YAML front matter (base model, library, tags) for the hub, then what a user needs: how to load the
adapter, what it was trained toward (target, levers, steps, LoRA settings) and, when an audit has been
run on it, the measured figures. The audit section sits between markers so a later audit replaces it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from fairtune.data import atomic_write_text, format_number

CARD = "README.md"
AUDIT_BEGIN = "<!-- fairtune:audit:begin -->"
AUDIT_END = "<!-- fairtune:audit:end -->"


def _fmt(v) -> str:
    """A table cell: a number with three decimals (``n/a`` for ``None``; a NaN as ``nan``), settings as
    JSON, anything else as ``str``."""
    if v is None or (isinstance(v, float) and not math.isnan(v)):
        return format_number(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=False, default=str)
    return str(v)


def model_card_text(
    *,
    base_model: str,
    kind: str,
    target: Mapping | None,
    levers: Mapping[str, Mapping | None],
    steps: int,
    lora: Mapping | None,
    extra: Mapping | None = None,
) -> str:
    """The card's text (without an audit section).

    Args:
        base_model: Folder or hub id of the base model the adapter was trained on.
        kind: Backbone kind (``sd`` or ``tiny``).
        target: The target mix (attributes and proportions), or ``None``.
        levers: Lever name to its settings (``None``: off), e.g. ``{"sampler": {...},
            "adversary": None, "fairness": {...}}``.
        steps: Optimizer steps trained.
        lora: LoRA settings (rank, alpha, target modules), or ``None`` for a full fine-tune.
        extra: Further rows for the training table (e.g. learning rate, seed).
    """
    tags = ["text-to-image", "diffusers", "lora", "fairtune", "debiasing"]
    if kind == "sd":
        tags.insert(0, "stable-diffusion")
    front = ["---", f"base_model: {json.dumps(base_model)}", "library_name: diffusers", "tags:"]
    front += [f"- {t}" for t in tags]
    front += ["inference: true", "---", ""]
    on = [name for name, cfg in levers.items() if cfg is not None]
    pipe = "StableDiffusionPipeline" if kind == "sd" else "DiffusionPipeline"
    lines = [
        f"# fairtune LoRA adapter for `{base_model}`",
        "",
        "A LoRA adapter trained with fairtune to move the distribution of a",
        "protected attribute in the base model's images toward a target mix, at training time.",
        "",
        "## Use",
        "",
        "```python",
        f"from diffusers import {pipe}",
        "",
        f"pipe = {pipe}.from_pretrained({base_model!r})",
        'pipe.load_lora_weights("path/to/this/folder")  # pytorch_lora_weights.safetensors',
        "```",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | `{base_model}` ({kind}) |",
        f"| target | {_fmt(dict(target)) if target else 'n/a'} |",
        f"| levers | {', '.join(on) if on else 'none (plain LoRA fine-tune)'} |",
        f"| steps | {steps} |",
        f"| LoRA | {_fmt(dict(lora)) if lora else 'full fine-tune'} |",
    ]
    for k, v in (extra or {}).items():
        lines.append(f"| {k} | {_fmt(v)} |")
    for name in on:
        lines.append(f"| {name} settings | {_fmt(levers[name])} |")
    lines += [
        "",
        AUDIT_BEGIN,
        "## Audit",
        "",
        "No audit recorded yet: run `fairtune audit` or `fairtune compare`.",
        AUDIT_END,
        "",
    ]
    return "\n".join(front + lines)


def write_model_card(folder: str | Path, **kwargs) -> Path:
    """Write ``folder/README.md`` (see :func:`model_card_text` for the arguments), keeping the audit
    section of an existing card. Atomic."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CARD
    text = model_card_text(**kwargs)
    if path.is_file():
        old = path.read_text()
        if AUDIT_BEGIN in old and AUDIT_END in old:
            kept = old[old.index(AUDIT_BEGIN) : old.index(AUDIT_END)]
            text = text[: text.index(AUDIT_BEGIN)] + kept + text[text.index(AUDIT_END) :]
    atomic_write_text(path, text)
    return path


SUMMARY_ROWS = (
    ("mean_dev_seen", "mean deviation from target, seen concepts"),
    ("mean_dev_heldout", "mean deviation from target, held-out concepts"),
    ("mean_dev_paraphrase", "mean deviation from target, paraphrases"),
    ("mean_dev_corrected_seen", "mean deviation, judge-corrected, seen concepts"),
    ("agreement", "agreement of two judges"),
    ("fidelity", "fidelity (concept recognised)"),
    ("frechet", "Fréchet distance to real images"),
    ("change_score", "same-seed change vs base"),
)


def audit_section(
    metrics: Mapping, *, method: str | None = None, command: str | None = None, source: str | None = None
) -> str:
    """Markdown for the audit section from a ``metrics.json`` dict: the adapter's summary beside the
    base model's, who judged, and the command (or the metrics file) that measured it."""
    methods = metrics.get("methods", {})
    if not methods:
        raise ValueError("metrics has no methods")
    if method is None:
        method = next((n for n, m in methods.items() if m.get("kind") == "adapter"), next(iter(methods)))
    if method not in methods:
        raise ValueError(f"method {method!r} not in metrics (methods: {list(methods)})")
    base = next((n for n, m in methods.items() if m.get("kind") == "base"), None)
    cols = [method] + ([base] if base and base != method else [])
    lines = ["## Audit", ""]
    if metrics.get("judges"):
        lines += [f"Judged by: {metrics['judges']}.", ""]
    if metrics.get("attribute"):
        lines += [f"Attribute `{metrics['attribute']}`, classes {metrics.get('classes')}.", ""]
    lines += ["| figure | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, label in SUMMARY_ROWS:
        vals = [methods[c].get("summary", {}).get(key) for c in cols]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in vals) + " |")
    if command:
        lines += ["", f"Measured with: `{command}`"]
    if source:
        lines += ["", f"Figures from `{source}`."]
    return "\n".join(lines)


def add_audit_to_model_card(folder: str | Path, metrics: Mapping, **kwargs) -> Path | None:
    """Replace the audit section of ``folder/README.md`` with figures from ``metrics`` (see
    :func:`audit_section`). Does nothing (returns ``None``) when the folder has no fairtune card."""
    path = Path(folder) / CARD
    if not path.is_file():
        return None
    old = path.read_text()
    if AUDIT_BEGIN not in old or AUDIT_END not in old:
        return None
    section = audit_section(metrics, **kwargs)
    new = (
        old[: old.index(AUDIT_BEGIN) + len(AUDIT_BEGIN)] + "\n" + section + "\n" + old[old.index(AUDIT_END) :]
    )
    atomic_write_text(path, new)
    return path
