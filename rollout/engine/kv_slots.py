"""CPU bookkeeping of the KV pool's slots: which are free. The tensors are in `model/kv_cache.py`."""

from __future__ import annotations


class SlotAllocator:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV slots, {len(self._free)} free")  # the scheduler checks first
        slots = [self._free.pop() for _ in range(n)]
        self._used.update(slots)
        return slots

    def free(self, slots: list[int]) -> None:
        for s in slots:
            if s not in self._used:
                raise RuntimeError(f"KV slot {s} freed twice or never allocated")
            self._used.discard(s)
            self._free.append(s)
        # Lowest first: sequences admitted together get consecutive slots in row order where
        # they can, and a step over consecutive slots reads its KV prefix as a view.
        self._free.sort(reverse=True)
