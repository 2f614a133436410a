"""``fairtune flag add | propose | list | export``: the flag store from the command line.

The store itself (:class:`fairtune.data.FlagStore`, the records, the prompt files) is library code in
``fairtune.data``; these functions only read options, call it and print. ``export`` writes the flagged
(and proposed) prompts as a prompt file that ``fairtune audit --prompts`` and the fairness loss's
``extra_prompts_file`` read.

Light: importing this module loads SQLAlchemy but never torch, Lightning or diffusers.
"""

from __future__ import annotations

import getpass
import json
import re
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from fairtune.data import Flag, FlagStore, Proposal, content_hash, write_prompt_file


def _hash_if_path(value: str | None) -> str | None:
    if value is None or not Path(value).exists():
        return None
    return content_hash(value)


def flag_add(
    *,
    db: str,
    prompt: str,
    model: str,
    scope: Literal["image", "prompt"] = "prompt",
    concept: str | None = None,
    adapter: str | None = None,
    model_hash: str | None = None,
    audit_run: str | None = None,
    image_index: int | None = None,
    seed: int | None = None,
    settings: dict | None = None,
    attribute: str | None = None,
    direction: str | None = None,
    note: str = "",
    reviewer: str | None = None,
) -> None:
    """Flag a prompt (or one image of it) as biased; prints the new flag's id.

    Args:
        db: SQLite file or SQLAlchemy URL of the flag store.
        prompt: The prompt.
        model: The base model (folder or shipped name); a folder is hashed.
        scope: ``prompt`` (the whole batch) or ``image`` (one image: give audit_run + image_index or seed).
        concept: The prompt's concept (e.g. ``digit 8``); default: the prompt itself.
        adapter: The adapter folder (hashed).
        model_hash: The model's hash, when ``model`` is not a readable folder.
        audit_run: The audit folder the image comes from (stored as an absolute path, as the review
            page stores it).
        image_index: The image's index within its prompt in that audit.
        seed: The seed of the image.
        settings: Generation settings that regenerate it (JSON object).
        attribute: The attribute judged (e.g. ``color``).
        direction: The class seen over-represented (e.g. ``red``).
        note: Free text.
        reviewer: Reviewer id; default: the user name.
    """
    store = FlagStore(db)
    fid = store.add_flag(
        Flag(
            prompt=prompt, model=model, reviewer=reviewer or getpass.getuser(), scope=scope, concept=concept,
            model_hash=model_hash or _hash_if_path(model), adapter=adapter,
            adapter_hash=_hash_if_path(adapter),
            audit_run=str(Path(audit_run).resolve()) if audit_run and Path(audit_run).exists() else audit_run,
            image_index=image_index, seed=seed, settings=settings, attribute=attribute,
            direction=direction, note=note,
        )
    )  # fmt: skip
    print(fid)


def flag_propose(
    *, db: str, prompt: str, concept: str | None = None, note: str = "", reviewer: str | None = None
):
    """Propose a prompt to audit next; prints its id.

    Args:
        db: SQLite file or SQLAlchemy URL of the flag store.
        prompt: The prompt.
        concept: Its concept; default: the prompt itself.
        note: Free text.
        reviewer: Reviewer id; default: the user name.
    """
    store = FlagStore(db)
    print(
        store.add_proposal(
            Proposal(prompt=prompt, reviewer=reviewer or getpass.getuser(), concept=concept, note=note)
        )
    )


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?")


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: escape sequences removed, other control characters
    (newlines included) shown as ``\\xNN``."""
    text = _ANSI.sub("", str(text))
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _table(rows: Iterable[list[str]], header: list[str]) -> str:
    rows = [header, *([printable(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def flag_list(*, db: str, prompt: str | None = None, json_lines: bool = False) -> None:
    """List flags (and proposals).

    Args:
        db: SQLite file or SQLAlchemy URL of the flag store.
        prompt: Only the flags of this prompt.
        json_lines: One JSON object per flag (then per proposal, with ``"proposal": true``).
    """
    store = FlagStore(db)
    flags = store.flags(prompt=prompt)
    props = store.proposals() if prompt is None else []
    if json_lines:
        for f in flags:
            print(json.dumps(asdict(f)))
        for p in props:
            print(json.dumps({**asdict(p), "proposal": True}))
        return
    print(
        _table(
            [
                [str(f.id), f.created_at or "", f.reviewer, f.scope,
                 "" if f.image_index is None else str(f.image_index), f.direction or "", f.prompt, f.note]
                for f in flags
            ],
            ["id", "time", "reviewer", "scope", "image", "direction", "prompt", "note"],
        )
    )  # fmt: skip
    if props:
        print("\nproposed prompts:")
        print(
            _table(
                [[str(p.id), p.reviewer, p.concept or "", p.prompt] for p in props],
                ["id", "reviewer", "concept", "prompt"],
            )
        )


def flag_export(*, db: str, out: Path, proposals: bool = True, min_flags: int = 1) -> None:
    """Write the flagged prompts to OUT, a prompt file for ``fairtune audit --prompts`` and for
    ``model.fairness.extra_prompts_file`` (YAML/JSON: concept -> prompts; other suffixes: text).

    Args:
        db: SQLite file or SQLAlchemy URL of the flag store.
        out: The prompt file to write.
        proposals: Include the proposed prompts.
        min_flags: Only prompts with at least this many flags.
    """
    prompts = FlagStore(db).flagged_prompts(proposals=proposals, min_flags=min_flags)
    write_prompt_file(prompts, out)
    print(f"wrote {sum(len(p) for p in prompts.values())} prompts of {len(prompts)} concepts to {out}")


def flag_commands() -> dict:
    """``fairtune flag``'s subcommands (jsonargparse's ``CLI`` dict)."""
    from . import COMMANDS

    return {
        "_help": COMMANDS["flag"],
        "add": flag_add,
        "propose": flag_propose,
        "list": flag_list,
        "export": flag_export,
    }
