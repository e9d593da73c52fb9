"""The process's RAM tier: cache entries kept in memory within ``cache.memory_budget_mb``."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class _Memory:
    """Entries held in this process's RAM, least recently used first, within a byte budget.

    Entries the current trial uses are never evicted for another one (that would keep both
    alive): a new entry that does not fit beside them is memory-mapped instead. Thread-safe:
    the cache's background writer adds the entries a GPU fill kept on the device.
    """

    def __init__(self) -> None:
        self.entries: OrderedDict[str, tuple[torch.Tensor, dict]] = OrderedDict()
        self.in_use: set[str] = set()
        self.budget = 0
        self.lock = threading.RLock()

    @property
    def nbytes(self) -> int:
        with self.lock:
            return sum(t.numel() * t.element_size() for t, _ in self.entries.values())

    def start_trial(self, budget: int) -> None:
        with self.lock:
            self.budget = budget
            self.in_use.clear()

    def get(self, key: str) -> tuple[torch.Tensor, dict] | None:
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                self.in_use.add(key)
                return self.entries[key]
            return None

    def put(self, key: str, rows: torch.Tensor, meta: dict, spare: bool = False) -> bool:
        """Keep ``rows`` if they fit the budget (evicting older entries); False if they do not.

        ``spare``: rows no trial asked for yet (a fill passed them on its way), or the host copy
        of rows a trial holds on the GPU: kept only where they fit beside the entries already
        held, evicting none, and not marked in use."""
        with self.lock:
            return self._put(key, rows, meta, spare)

    def _put(self, key: str, rows: torch.Tensor, meta: dict, spare: bool) -> bool:
        size = rows.numel() * rows.element_size()
        if spare:
            if key in self.entries or self.nbytes + size > self.budget:
                return False
            self.entries[key] = (rows, meta)
            self.entries.move_to_end(key, last=False)  # the first to go for what a trial uses
            return True
        for old in [k for k in self.entries if k not in self.in_use]:  # least recent first
            if self.nbytes + size <= self.budget:
                break
            del self.entries[old]
        if self.nbytes + size > self.budget:
            return False
        self.entries[key] = (rows, meta)
        self.in_use.add(key)
        return True

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.in_use.clear()


MEMORY = _Memory()
