"""Epoch-wise batch iterators with a resumable position (chat conversations, preference pairs)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np


class EpochBatches:
    """Iterates the batches of one epoch after another (``_build_epoch``, built lazily); the position
    ``{"epoch", "batch_in_epoch"}`` is saved with each checkpoint and restored with ``set_state``.

    Subclasses set ``loop`` (False: stop after one epoch), ``shuffle``, ``seed``, ``batch_size``,
    ``process_index`` / ``process_count``, ``epoch = batch_in_epoch = 0`` and ``_epoch_batches = None`` in their
    constructor and implement ``_build_epoch() -> list of batches`` (with ``_order`` and ``_batches``).
    """

    loop: bool
    shuffle: bool
    seed: int
    batch_size: int
    process_index: int
    process_count: int
    epoch: int
    batch_in_epoch: int
    _epoch_batches: list[dict[str, np.ndarray]] | None

    def _build_epoch(self) -> list[dict[str, np.ndarray]]:
        raise NotImplementedError

    def _order(self, n: int) -> np.ndarray:
        """The order of the ``n`` examples in this epoch (a fresh permutation per epoch when shuffling)."""
        order = np.arange(n)
        return np.random.default_rng((self.seed, self.epoch)).permutation(order) if self.shuffle else order

    def _batches(self, rows: list, empty_row: Callable[[], dict[str, np.ndarray]],
                 stack: Callable[[Sequence[dict[str, np.ndarray]]], dict[str, np.ndarray]]
                 ) -> list[dict[str, np.ndarray]]:
        """Rows in global batches of ``batch_size``, the last one padded with ``empty_row()`` (weight 0) rather than
        dropped; each process keeps its own rows of every batch (``process_index::process_count``)."""
        while len(rows) % self.batch_size:
            rows.append(empty_row())
        sl = slice(self.process_index, None, self.process_count)
        return [stack(rows[i:i + self.batch_size][sl]) for i in range(0, len(rows), self.batch_size)]

    def __iter__(self) -> EpochBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._epoch_batches is None:
            self._epoch_batches = self._build_epoch()
        if self.batch_in_epoch >= len(self._epoch_batches):
            if not self.loop:
                raise StopIteration
            self.epoch, self.batch_in_epoch, self._epoch_batches = self.epoch + 1, 0, None
            return next(self)
        batch = self._epoch_batches[self.batch_in_epoch]
        self.batch_in_epoch += 1
        return batch

    def batches_per_epoch(self) -> int:
        if self._epoch_batches is None:
            self._epoch_batches = self._build_epoch()
        return len(self._epoch_batches)

    def get_state(self) -> dict[str, int]:
        """The iterator position (JSON-serialisable; saved with each checkpoint)."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def set_state(self, state: Mapping[str, int]) -> None:
        """Continue from a ``get_state()``."""
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self._epoch_batches = None
