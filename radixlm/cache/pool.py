"""The KV pool (per-layer K/V tensors indexed by slot) and the free list of its slots."""

from __future__ import annotations

import torch


class KVPool:
    """Per-layer K and V tensors of [num_kv_heads, num_slots + 1, head_dim]; slot 0 is a padding
    sink that is never allocated (padded gathers point at it).

    Head-major, so that a gather of many slots yields [kv_heads, tokens, head_dim] blocks that
    batched matmuls read without another copy.
    """

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_kv_heads, num_slots + 1, head_dim)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for _ in range(num_layers):
            for store in (self.k, self.v):
                # Empty, not zeros: a slot is always written before it is read, so only the
                # padding slot needs finite values (a masked score times NaN is still NaN).
                t = torch.empty(shape, dtype=dtype, device=self.device)
                t[:, 0].zero_()
                store.append(t)

    @staticmethod
    def bytes_per_slot(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes one slot costs across all layers, K and V together (for sizing from a budget)."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes held by all K and V tensors, padding slot included."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


class SlotAllocator:
    """Free list of slot ids 1..num_slots."""

    def __init__(
        self, num_slots: int, device: torch.device | str = "cpu", check: bool = False
    ) -> None:
        """With check=True every free is validated (range, double free); for tests, O(num_slots) memory."""
        if num_slots < 1:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.check = check
        self.reset()

    def reset(self) -> None:
        """Mark every slot free again."""
        # The free ids are self._free[self._head :] followed by the chunks in self._pending.
        # Alloc only moves the head (one slice); freed chunks are concatenated lazily, on the
        # first alloc that needs them, so a free costs O(len(slots)), not a copy of the list.
        self._free = torch.arange(1, self.num_slots + 1, dtype=torch.int64, device=self.device)
        self._head = 0
        self._free_len = self.num_slots
        self._pending: list[torch.Tensor] = []
        self._num_free = self.num_slots
        if self.check:
            self._is_free = torch.ones(self.num_slots + 1, dtype=torch.bool, device=self.device)
            self._is_free[0] = False

    @property
    def num_free(self) -> int:
        """How many slots can be allocated now."""
        return self._num_free

    def alloc(self, n: int) -> torch.Tensor | None:
        """Take n slot ids (int64, 1-D); None, with nothing changed, when fewer than n are free."""
        if n > self._num_free:
            return None
        end = self._head + n
        if end > self._free_len:
            self._free = torch.cat([self._free[self._head :], *self._pending])
            self._pending.clear()
            self._head, end, self._free_len = 0, n, self._num_free
        # A view of the free list is safe to hand out: the list is only ever sliced or replaced
        # by a new tensor, never written in place.
        slots = self._free[self._head : end]
        self._head = end
        self._num_free -= n
        if self.check:
            self._is_free[slots] = False
        return slots

    def free(self, slots: torch.Tensor) -> None:
        """Return 1-D slot ids to the free list; the caller must no longer use them."""
        n = slots.numel()
        if n == 0:
            return
        # Copied because the caller's tensor is often a view of a table it will reuse.
        slots = slots.to(self.device, torch.int64, copy=True)
        if self.check:
            self._check_free(slots)
        self._pending.append(slots)
        self._num_free += n

    def free_slots(self) -> torch.Tensor:
        """Every free slot id, in allocation order (for tests and debugging)."""
        return torch.cat([self._free[self._head :], *self._pending])

    def _check_free(self, slots: torch.Tensor) -> None:
        if slots.dim() != 1:
            raise ValueError(f"slot ids must be 1-D, got shape {tuple(slots.shape)}")
        if int(slots.min()) < 1 or int(slots.max()) > self.num_slots:
            raise ValueError(f"slot ids outside 1..{self.num_slots}: {slots.tolist()}")
        if slots.unique().numel() != slots.numel():
            raise ValueError(f"slot ids freed twice in one call: {slots.tolist()}")
        if bool(self._is_free[slots].any()):
            double = slots[self._is_free[slots]].tolist()
            raise ValueError(f"double free of slots {double}")
        self._is_free[slots] = True
