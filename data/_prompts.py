"""Prompt files: the one reader (:func:`read_prompt_data`) under every format that reads them
(``fairtune audit --prompts``, lever 3's extra prompts, ``fairtune flag export``'s output)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ._io import atomic_write_text


def read_prompt_data(path: str | os.PathLike) -> object:
    """A prompt file's raw content, as every prompt-file reader starts: a text file's non-blank,
    non-``#`` lines (a list of prompts); a YAML or JSON file's parsed value, unwrapped from
    ``{prompts: ...}``.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: It is not UTF-8 text, or not valid YAML/JSON (naming the file).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        where = f"{e.reason} at byte {e.start}"
        raise ValueError(f"prompts file {str(path)!r} is not UTF-8 text ({where})") from e
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"prompts file {str(path)!r} is not valid {path.suffix[1:].upper()}: {e}") from e
    else:
        lines = (line.strip() for line in text.splitlines())
        data = [line for line in lines if line and not line.startswith("#")]
    if isinstance(data, dict) and set(data) == {"prompts"}:
        data = data["prompts"]
    return data


def write_prompt_file(prompts: dict[str, list[str]], path: str | os.PathLike) -> Path:
    """Write concept -> prompts as a prompt file, atomically: YAML/JSON (the mapping: a concept's
    first prompt is audited as ``seen``, the others as ``paraphrase``) or, for any other suffix, text
    (one prompt per line, each its own concept).

    Raises:
        ValueError: No prompt to write.
    """
    path = Path(path)
    if not any(prompts.values()):
        raise ValueError(f"no prompt to write to {str(path)!r} (no flag matched)")
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps(prompts, indent=2) + "\n"
    elif suffix in (".yaml", ".yml"):
        import yaml

        text = "# flagged prompts (fairtune flag export): concept -> prompts\n" + yaml.safe_dump(
            prompts, sort_keys=False, allow_unicode=True
        )
    else:
        text = "".join(p + "\n" for ps in prompts.values() for p in ps)
    atomic_write_text(path, text)
    return path


def read_prompt_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(concept, prompt) pairs from a prompt file, in the formats ``fairtune audit --prompts`` reads:
    text (one prompt per line, ``#`` comments; each prompt its own concept); YAML/JSON holding a list
    of prompts, a mapping concept -> prompt or -> list of prompts, ``{prompts: ...}``, or a list of
    prompt groups (``{prompts: {concept: prompt}}`` or ``{template, values, concept}``).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: It holds no prompt or an unreadable structure (naming the file).
    """
    data = read_prompt_data(path)
    path = Path(path)
    pairs: list[tuple[str, str]] = []
    if isinstance(data, list):
        for item in data:
            if isinstance(item, str):
                pairs.append((item, item))
            elif isinstance(item, dict) and isinstance(item.get("prompts"), dict):
                pairs += [(str(c), str(p)) for c, p in item["prompts"].items()]
            elif isinstance(item, dict) and "template" in item:
                concept = item.get("concept", "{value}")
                pairs += [
                    (concept.format(value=v), item["template"].format(value=v))
                    for v in item.get("values", [])
                ]
            else:
                raise ValueError(f"prompts file {str(path)!r}: cannot read entry {item!r}")
    elif isinstance(data, dict):
        for c, ps in data.items():
            for p in [ps] if isinstance(ps, str) else list(ps or []):
                if not isinstance(p, str):
                    raise ValueError(f"prompts file {str(path)!r}: concept {c!r} maps to a non-string {p!r}")
                pairs.append((str(c), p))
    elif data is not None:
        raise ValueError(
            f"prompts file {str(path)!r}: expected a list or a mapping, got {type(data).__name__}"
        )
    if not pairs:
        raise ValueError(f"prompts file {str(path)!r} holds no prompt")
    return pairs
