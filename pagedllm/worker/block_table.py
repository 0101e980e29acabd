"""The worker's block tables: one persistent numpy array with a row per live sequence.

Each step's KV slots and block-table rows used to be rebuilt from per-sequence Python lists
(one small array conversion per sequence per step). Here a sequence gets a row when the worker
first sees it and keeps it until it finishes; the step contract's diffs append block ids to
the row or replace it, and a step's slot mapping and block tables are then a few vectorized
gathers over the rows it schedules (``step_inputs.py``). Both dimensions grow by doubling, so
no limit on live sequences or context length is assumed here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BlockTable:
    """Block ids by row: ``array[row, :num_blocks[row]]`` are the row's blocks in order."""

    def __init__(self, rows: int = 64, width: int = 64) -> None:
        self.array = np.zeros((rows, width), dtype=np.int32)
        self.num_blocks = np.zeros(rows, dtype=np.int32)
        self._free = list(range(rows - 1, -1, -1))  # pop() hands out the lowest row first

    def add_row(self) -> int:
        """A free row, emptied."""
        if not self._free:
            old = self.array.shape[0]
            self._resize(2 * old, self.array.shape[1])
            self._free = list(range(2 * old - 1, old - 1, -1))
        row = self._free.pop()
        self.num_blocks[row] = 0
        return row

    def free_row(self, row: int) -> None:
        self._free.append(row)

    def set(self, row: int, block_ids: Sequence[int]) -> None:
        """Replace the row's blocks."""
        self.num_blocks[row] = 0
        self.append(row, block_ids)

    def append(self, row: int, block_ids: Sequence[int]) -> None:
        if not block_ids:
            return
        start = int(self.num_blocks[row])
        end = start + len(block_ids)
        if end > self.array.shape[1]:
            self._resize(self.array.shape[0], max(end, 2 * self.array.shape[1]))
        self.array[row, start:end] = block_ids
        self.num_blocks[row] = end

    def ids(self, row: int) -> list[int]:
        """The row's block ids as a list."""
        return self.array[row, : self.num_blocks[row]].tolist()

    def _resize(self, rows: int, width: int) -> None:
        old_rows, old_width = self.array.shape
        array = np.zeros((rows, width), dtype=np.int32)
        array[:old_rows, :old_width] = self.array
        self.array = array
        num_blocks = np.zeros(rows, dtype=np.int32)
        num_blocks[:old_rows] = self.num_blocks
        self.num_blocks = num_blocks
