"""Indexing many units' state rows at once, cheaply in the usual case.

The forecaster keeps each unit's state in row ``r`` of many arrays and steps all units together.
Units keep their rows, so a step usually asks for one ascending run of rows, all at the same ring
position: then a slice (a view) and one column replace fancy indexing (a copy of every row).
Both give the same numbers; these helpers only pick the cheaper way to read and write them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["row_index", "shared_position"]


def row_index(rows: np.ndarray) -> np.ndarray | slice:
    """``rows`` as a slice when they are one ascending run (the usual case: a detector's units,
    in the order they were first seen), so reading state is a view rather than a copy."""
    n = len(rows)
    if n and int(rows[-1]) - int(rows[0]) == n - 1 and (n == 1 or bool((rows[1:] > rows[:-1]).all())):
        return slice(int(rows[0]), int(rows[0]) + n)
    return rows


def shared_position(pos: np.ndarray) -> int | None:
    """The ring position every row is at, or None when they differ (rows that joined later)."""
    if len(pos) and pos[0] == pos.min() == pos.max():
        return int(pos[0])
    return None
