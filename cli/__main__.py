"""``python -m fairtune.cli``: the ``fairtune`` command (how launchers start ``fairtune fit``)."""

from . import main

main()
