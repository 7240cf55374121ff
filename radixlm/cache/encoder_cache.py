"""The encoder-output cache: projected image features by pixel digest, bounded, LRU."""

from __future__ import annotations

from collections import OrderedDict

import torch

# Default budget: ~55 LLaVA-1.5-7B images (576 x 4096 float32 features, 9 MiB each).
DEFAULT_CACHE_BYTES = 512 << 20


class EncoderCache:
    """Features of recently seen images, so the vision tower runs once per distinct image while
    it stays here; least recently used entries go first when `max_bytes` would be exceeded
    (0 keeps nothing)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, digest: str) -> torch.Tensor | None:
        """The features of the image with this digest, if cached (counted as a hit or a miss)."""
        found = self.entries.get(digest)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(digest)
        return found

    def put(self, digest: str, features: torch.Tensor) -> None:
        """Keep features, evicting the least recently used; one larger than the budget is not kept."""
        size = features.numel() * features.element_size()
        if size > self.max_bytes or digest in self.entries:
            return
        while self.entries and self.bytes + size > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.entries[digest] = features
        self.bytes += size
