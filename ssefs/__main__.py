"""``python -m ssefs``: the same as the ``ssefs`` command (including its mount(8) helper form)."""

from .mounthelper import entry

entry()
