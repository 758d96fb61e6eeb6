"""``python -m ssefs``: the same as the ``ssefs`` command."""

from .cli import main

main()
