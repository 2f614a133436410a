"""The ``fairtune`` command line: the only core layer that imports every core package.

``fairtune fit --config A.yaml [--config B.yaml]`` train (LightningCLI; resumes a killed run)
``fairtune compare --config C.yaml --out DIR``  every method on the same prompts, seeds and judges
``fairtune audit --model PATH --prompts FILE --out DIR``  one model's judged attribute mix
``fairtune dial --model PATH --adapter DIR --prompts FILE --out DIR [--request JSON]``  the judged mix
    against the adapter's scale, and the scale per concept for a requested mix (checked)
``fairtune sweep SPEC.yaml --out DIR [--workers N | --slurm true]``  ablation grid, resumable
``fairtune flag add|propose|list|export --db FILE ...``  reviewers' flags on biased outputs
``fairtune review --audit DIR --db FILE``  a local page to review an audit and flag images

Plugins add commands through the ``fairtune.commands`` entry point (:func:`plugins`): the embedded
benchmark (``fairtune.colored_digits``) adds ``fairtune demo`` (the main job), ``fairtune data
colored-digits``, ``fairtune judges train`` and ``fairtune classifier train``.

Every entry point is a typed function whose signature is its option schema (jsonargparse), so a
misspelt option or a value of the wrong type fails before any work with a message naming it.
"""

from __future__ import annotations

import json
import os
import sys

from fairtune.data import lazy_facade

# name -> submodule: the public facade, loaded on first use (PEP 562) so that `fairtune --help`,
# `fairtune flag` and `fairtune review` start without importing torch, Lightning or diffusers
_EXPORTS = {
    "FairtuneCLI": "._fit",
    "run_fit_cli": "._fit",
    "Spec": "._sweep_spec",
    "SweepError": "._sweep_spec",
    "load_spec": "._sweep_spec",
    "read_status": "._sweep_spec",
    "check_goals": "._sweep_report",
    "write_report": "._sweep_report",
    "write_slurm": "._sweep_report",
    "run_sweep": "._sweep",
    "sweep": "._sweep",
    "audit_command": "._commands",
    "compare_command": "._commands",
    "dial_command": "._commands",
    "load_compare_config": "._commands",
    "flag_add": "._flag",
    "flag_export": "._flag",
    "flag_list": "._flag",
    "flag_propose": "._flag",
    "ReviewServer": "._review",
    "review_command": "._review",
    "serve_review": "._review",
    "augment_command": "._augment",
}

__all__ = [*_EXPORTS, "COMMANDS", "PLUGIN_GROUP", "command_help", "fit_argv", "main", "plugins"]

# The core's subcommands and what each does: `fairtune --help` prints these and every plugin's (its
# module's HELP) without importing the command set (tests/test_cli.py checks it lists exactly the full
# parser's subcommands).
COMMANDS = {
    "fit": "Train an adapter or a full fine-tune (resumes a killed run); `fairtune fit --help`.",
    "compare": "Compare methods on the same prompts, seeds and judges; write OUT/metrics.json and a report.",
    "audit": "Audit one model (optionally with a LoRA adapter): generate, judge, report.",
    "dial": "The judged mix per concept against the adapter's scale; with --request, the scale per concept.",
    "sweep": "Run an ablation sweep (arms x values x seeds), resumable.",
    "data": "Make or extend training data (augment a table with generated images; plugins add more).",
    "classifier": "Train an attribute classifier: a CLIP linear probe (plugins add more).",
    "flag": "Reviewers' flags on biased outputs (a SQL database; docs/feedback_loop.md).",
    "review": "A local page to review an audit's images and flag them.",
}
PLUGIN_GROUP = "fairtune.commands"


def plugins() -> list:
    """The command plugins: modules registered under the ``fairtune.commands`` entry point (the embedded
    benchmark's is ``fairtune.colored_digits._plugin``), each with ``commands()`` (its part of the
    subcommand table; a group such as ``data`` merges into the core's) and ``HELP`` (one line per
    top-level command it adds)."""
    from importlib.metadata import entry_points

    loaded = []
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name):
        try:
            loaded.append(ep.load())
        except Exception as e:  # name the plugin: its own traceback says little about where it came from
            raise ImportError(f"the fairtune.commands plugin {ep.name} ({ep.value}) did not load: {e}") from e
    return loaded


def command_help() -> dict[str, str]:
    """Every top-level command and its line: the core's, then the plugins' new ones."""
    out = dict(COMMANDS)
    for plugin in plugins():
        out.update({k: v for k, v in getattr(plugin, "HELP", {}).items() if k not in out})
    return out


_DESCRIPTION = (
    "Debias text-to-image diffusion models at training time, and compare with inference-time fixes. "
    "`fairtune <command> --help` lists a command's options."
)


__getattr__, __dir__ = lazy_facade(__name__, {k: (m, k) for k, m in _EXPORTS.items()}, globals())


def _usage() -> str:
    table = command_help()
    width = max(map(len, table))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, text in table.items())
    return (
        f"usage: fairtune [-h] {{{','.join(table)}}} ...\n\n{_DESCRIPTION}\n\ncommands:\n{rows}\n\n"
        "options:\n  -h, --help  Show this help message and exit.\n  --debug     Show tracebacks."
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fairtune`` console script.

    Expected errors (a bad config or schema, a missing or unreadable file, a failed run) print one
    line naming what is wrong and exit 2 (bad input) or 1 (a failure while running); ``--debug`` (or
    ``FAIRTUNE_DEBUG=1``) shows the traceback instead.
    """
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FAIRTUNE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in ("fit", "validate"):
        argv = fit_argv(argv)
    if from_shell:  # what LightningCLI (and DDP's relaunch of this command) read
        sys.argv = [sys.argv[0], *argv]
    if debug or not from_shell:  # called from Python (tests, notebooks): exceptions propagate
        _run(argv)
        return
    try:
        _run(argv)
    except KeyboardInterrupt:
        print("fairtune: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, KeyError, TypeError) as e:  # bad input: configs, schemas, file contents
        print(f"fairtune: error: {_one_line(e)}{_HINT}", file=sys.stderr)
        raise SystemExit(2) from None
    except (OSError, RuntimeError, ImportError) as e:  # missing files, failed runs
        print(f"fairtune: error: {_one_line(e)}{_HINT}", file=sys.stderr)
        raise SystemExit(1) from None


_HINT = "  (--debug shows the traceback)"
_NULLS = ("null", "Null", "NULL", "None", "~")


def _nested(key: str, value) -> str:
    out = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return json.dumps(out)


def fit_argv(argv: list[str]) -> list[str]:
    """``fairtune fit`` arguments as the parser should read them.

    - ``--a.b.c null`` (a key two levels down or more) becomes an inline config ``{"a": {"b": {"c":
      null}}}`` at the same place: jsonargparse reads a null given as a nested argument under an
      optional section as the string ``'None'`` (or fails for a number), but reads it from a config.
    - ``--X.module NAME`` (a class from a config, e.g. ``model.fairness.classifier``) starts
      ``X.init_args`` afresh, as LightningCLI's ``class_path`` does: the previous class's arguments
      are not merged into the new class's (``--X.init_args.KEY`` after it add to the new ones).
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        key, value, used = None, None, 1
        if a.startswith("--") and "=" in a:
            key, value = a[2:].split("=", 1)
        elif a.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value, used = a[2:], argv[i + 1], 2
        if key is not None and key.count(".") >= 2 and value in _NULLS:
            out += ["--config", _nested(key, None)]
        elif key is not None and key.count(".") >= 1 and key.endswith(".module"):
            out += argv[i : i + used]
            out += ["--config", _nested(key[: -len(".module")] + ".init_args", {})]
        else:
            out += argv[i : i + used]
        i += used
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}" if len(lines) <= 40 else lines[0]


def _run(argv: list[str]) -> None:
    from jsonargparse import CLI

    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        if not argv:
            raise SystemExit(2)
        return
    if argv[0] in ("fit", "validate"):
        from ._fit import run_fit_cli

        run_fit_cli(None if argv == sys.argv[1:] else argv)
        return
    if argv[0] == "flag":  # light commands: the flag store and the review page need no model stack
        from ._flag import flag_commands

        table = {"flag": flag_commands()}
    elif argv[0] == "review":
        from ._review import review_command

        table = {"review": review_command}
    else:
        from ._app import commands

        table = commands()
    CLI(table, args=argv, prog="fairtune", description=_DESCRIPTION)


if __name__ == "__main__":
    main()
