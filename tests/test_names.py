"""Which names a listing shows: exactly those a lookup accepts (pure logic)."""

from __future__ import annotations

import pytest

from ssefs.vfs import _showable


@pytest.mark.parametrize("name", ["a", "file.txt", "ünïcødé", "with space", "n" * 255, "€" * 85])
def test_ordinary_names_are_shown(name: str) -> None:
    assert _showable(name)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "back\\slash", "n" * 256, "€" * 86])
def test_names_no_path_can_carry_are_hidden(name: str) -> None:
    assert not _showable(name)
