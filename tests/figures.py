"""Per-test figures added up into a module's totals (the ``FIGURES`` lines of the reliability tests)."""

from __future__ import annotations

from collections import Counter
from dataclasses import fields
from typing import Any


def accumulate(total: Any, part: Any) -> None:
    """Add ``part``'s counts into ``total`` (same dataclass): ints add up, floats keep the largest
    (a slowest time), Counters merge; other fields (locks) are left alone."""
    for field in fields(total):
        value = getattr(part, field.name)
        if isinstance(value, Counter):
            getattr(total, field.name).update(value)
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            setattr(total, field.name, getattr(total, field.name) + value)
        elif isinstance(value, float):
            setattr(total, field.name, max(getattr(total, field.name), value))
