"""The disk tier under the radix tree: what the pool evicts goes to disk, and comes back on a hit.

Nodes are in the pool, on disk, or both (`TreeNode.in_pool`, `TreeNode.disk`). When the tree
evicts an unlocked pool leaf, `keep` decides by the admission policy whether its K/V is worth
writing; if so, the step copies the slots' K/V out of the pool (a bounded copy: the evicted
tokens) and the store's writer thread puts it on disk, off the critical path. A match that runs
into disk-only nodes loads them back first (`RadixCache.load_prefix`).

Admission policies (`--kv-disk-policy`):

- `selective` (default): a node is written if it has been hit at least once, is shared (two or
  more children), holds at least `SELECTIVE_MIN_TOKENS` tokens (a recompute is expensive), or
  was seen before: a `GHOST_CHUNK`-token piece of its path belonged to a node evicted unwritten
  earlier (the tier remembers the last `MAX_GHOSTS` such pieces by hash, so a prefix that
  comes back after its node was dropped is written the second time). One-off prefixes are not
  worth the disk traffic.
- `write_through`: every evicted node is written.
- `off`: nothing new is written; blocks already on disk are still served.

Whatever the policy, a node whose children are on disk is written when it leaves the pool (its
descendants are reachable only through it), and a graceful shutdown writes what the policy
would keep that is still only in the pool (ancestors first), within `SHUTDOWN_FLUSH_S`.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from radixlm.cache.disk import BlockEntry, DiskStore
from radixlm.cache.pool import KVPool
from radixlm.cache.radix import RadixCache, TreeNode, common_prefix_len

logger = logging.getLogger(__name__)

POLICIES = ("selective", "write_through", "off")
SELECTIVE_MIN_TOKENS = 256
GHOST_CHUNK = 64
MAX_GHOSTS = 1 << 16
SHUTDOWN_FLUSH_S = 5.0
# Bumped whenever the bytes of a block for the same model and settings would change.
LAYOUT_VERSION = 1


@dataclass(frozen=True, slots=True)
class DiskRange:
    """A node's tokens within a block: positions lo..hi of the block's own tokens."""

    entry: BlockEntry
    lo: int
    hi: int


class DiskTier:
    """The RadixCache's tier below the pool (see the module docstring)."""

    def __init__(self, store: DiskStore, pool: KVPool, policy: str = "selective") -> None:
        if policy not in POLICIES:
            raise ValueError(f"kv disk policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.store, self.pool, self.policy = store, pool, policy
        self.cache: RadixCache | None = None
        self.loaded_tokens = 0  # tokens read back into the pool: hits served from disk
        self._pinned = pool.device.type == "cuda"  # device pool <-> pinned host buffer <-> disk
        # Hashes of path pieces of nodes evicted unwritten (selective), oldest first.
        self._ghosts: OrderedDict[int, None] = OrderedDict()

    def attach(self, cache: RadixCache) -> None:
        """Become cache's tier and rebuild the tree's disk-only nodes from the blocks on disk."""
        self.cache = cache
        cache.tier = self
        entries = self.store.found
        rank = {id(e): i + 1 for i, e in enumerate(entries)}  # oldest access first
        attached = 0
        for entry in sorted(entries, key=lambda e: len(e.prefix)):
            handle = DiskRange(entry, 0, len(entry.tokens))
            node = cache.attach_disk(entry.prefix, entry.tokens, handle, entry.salt)
            if node is None:  # its prefix is not on disk (never written, or evicted): unreachable
                self.store.release(entry)
                continue
            node.last_access = rank[id(entry)]
            attached += len(entry.tokens)
        self.store.found = []
        self._make_room(0)  # the bound may have been lowered since the blocks were written
        if entries:
            logger.info(
                "KV disk tier: %d tokens in %d blocks found in %s",
                attached,
                len(entries),
                self.store.dir,
            )

    # ---- the tree's EvictionTier ---------------------------------------------------------

    def keep(self, node: TreeNode) -> bool:
        """Write node's K/V to disk if the policy admits it (or its children are on disk)."""
        if node.disk is not None:
            return True
        if self.admits(node) or any(c.disk is not None for c in node.children.values()):
            return self._write(node)
        if self.policy == "selective":
            pieces = self._pieces(node)
            if any(h in self._ghosts for h in pieces):
                return self._write(node)
            for h in pieces:
                self._ghosts[h] = None
            while len(self._ghosts) > MAX_GHOSTS:
                self._ghosts.popitem(last=False)
        return False

    def _pieces(self, node: TreeNode) -> list[int]:
        """Hashes of the GHOST_CHUNK-aligned pieces of node's path that end inside its key (each
        hash covers the whole path up to its piece)."""
        assert self.cache is not None
        path = self.cache.path_key(node)
        start = node.depth - len(node.key)
        h, out = 0, []
        for end in range(GHOST_CHUNK, node.depth + 1, GHOST_CHUNK):
            h = hash((h, tuple(path[end - GHOST_CHUNK : end])))
            if end > start:
                out.append(h)
        return out

    def admits(self, node: TreeNode) -> bool:
        """The admission policy: is this node worth a disk write?"""
        if self.policy == "write_through":
            return True
        if self.policy == "off":
            return False
        return node.hits > 0 or len(node.children) > 1 or len(node.key) >= SELECTIVE_MIN_TOKENS

    def split(self, handle: DiskRange, m: int) -> tuple[DiskRange, DiskRange]:
        """Both halves of a split node keep a range of the same block."""
        self.store.retain(handle.entry)
        mid = handle.lo + m
        return DiskRange(handle.entry, handle.lo, mid), DiskRange(handle.entry, mid, handle.hi)

    def drop(self, node: TreeNode) -> None:
        """node no longer needs its disk copy."""
        handle: DiskRange = node.disk
        node.disk = None
        self.store.release(handle.entry)

    def read(self, node: TreeNode) -> torch.Tensor | None:
        """node's K/V, [layers, 2, kv_heads, n, head_dim] on the CPU; None if the block is lost."""
        handle: DiskRange = node.disk
        data = self.store.read(handle.entry)
        if data is None:
            return None
        return data[:, :, :, handle.lo : handle.hi]

    def load(self, slots: torch.Tensor, data: torch.Tensor) -> None:
        """Write K/V read from disk into the pool at slots."""
        pool = self.pool
        if pool.device.type == "cpu":
            rows = slots.numpy()
            for layer in range(pool.num_layers):
                _numpy(pool.k[layer])[:, rows] = _numpy(data[layer, 0])
                _numpy(pool.v[layer])[:, rows] = _numpy(data[layer, 1])
        else:
            if self._pinned:
                data = data.pin_memory().to(pool.device, non_blocking=True)
            index = slots.to(pool.device)
            for layer in range(pool.num_layers):
                pool.k[layer].index_copy_(1, index, data[layer, 0])
                pool.v[layer].index_copy_(1, index, data[layer, 1])
        self.loaded_tokens += slots.numel()

    def prefetch(self, ids: list[int]) -> None:
        """Start reading the disk-only nodes on ids' cached path (a request was queued), so that
        its admission finds them in memory: the reads overlap the running batch's steps."""
        assert self.cache is not None
        node, pos = self.cache.root, 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                return
            if not child.in_pool:
                self.store.prefetch(child.disk.entry)
            m = common_prefix_len(child.key, ids, pos)
            if m < len(child.key):
                return
            node, pos = child, pos + m

    # ---- writes -----------------------------------------------------------------------------

    def _write(self, node: TreeNode) -> bool:
        """Copy node's K/V out of the pool and queue it for the writer; False if refused."""
        assert self.cache is not None and node.parent is not None and node.in_pool
        data = self._gather(node.value)
        nbytes = data.numel() * data.element_size()
        if nbytes > self.store.capacity_bytes:
            return False
        self._make_room(nbytes)
        prefix = self.cache.path_key(node.parent)
        entry = self.store.put(prefix, list(node.key), node.salt, data)
        if entry is None:
            return False
        node.disk = DiskRange(entry, 0, len(node.key))
        return True

    def _gather(self, slots: torch.Tensor) -> torch.Tensor:
        """The slots' K/V as one new host tensor [layers, 2, kv_heads, n, head_dim]."""
        pool = self.pool
        shape = (pool.num_layers, 2, pool.num_kv_heads, slots.numel(), pool.head_dim)
        out = torch.empty(shape, dtype=pool.dtype, pin_memory=self._pinned)
        if pool.device.type == "cpu":
            rows, dst = slots.numpy(), _numpy(out)
            for layer in range(pool.num_layers):
                dst[layer, 0] = _numpy(pool.k[layer])[:, rows]
                dst[layer, 1] = _numpy(pool.v[layer])[:, rows]
            return out
        index = slots.to(pool.device)
        for layer in range(pool.num_layers):
            out[layer, 0].copy_(pool.k[layer].index_select(1, index))
            out[layer, 1].copy_(pool.v[layer].index_select(1, index))
        return out

    def _make_room(self, nbytes: int) -> None:
        """Drop disk copies, least recently used first, until nbytes more fit the bound. Only a
        copy with no copy below it goes (a disk-only node leaves the tree with it)."""
        store, cache = self.store, self.cache
        assert cache is not None
        if store.used_bytes + nbytes <= store.capacity_bytes:
            return
        heap = [
            (n.last_access, n.uid, n)
            for n in cache.disk_nodes()
            if not any(c.disk is not None for c in n.children.values())
        ]
        heapq.heapify(heap)
        while heap and store.used_bytes + nbytes > store.capacity_bytes:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            if parent is None or node.disk is None:
                continue
            if node.in_pool:
                self.drop(node)
            else:
                cache.remove(node)
            if (
                parent.disk is not None
                and parent.parent is not None
                and not any(c.disk is not None for c in parent.children.values())
            ):
                heapq.heappush(heap, (parent.last_access, parent.uid, parent))

    # ---- shutdown and stats ---------------------------------------------------------------

    def close(self, timeout_s: float = SHUTDOWN_FLUSH_S) -> None:
        """Write what the policy keeps that is only in the pool (ancestors first), wait for the
        writer at most timeout_s in all, and release the directory."""
        deadline = time.monotonic() + timeout_s
        if self.cache is not None and self.policy != "off":
            nodes = list(self.cache.preorder())
            wanted: set[TreeNode] = set()
            for node in reversed(nodes):  # children before their parents
                if (
                    node.in_pool
                    and node.disk is None
                    and (self.admits(node) or any(c in wanted for c in node.children.values()))
                ):
                    wanted.add(node)
            for node in nodes:
                if node in wanted and time.monotonic() < deadline:
                    self._write(node)
        self.store.close(max(deadline - time.monotonic(), 0.0))

    @property
    def disk_tokens(self) -> int:
        """Tokens of the tree with a copy on disk."""
        if self.cache is None:
            return 0
        return sum(n.disk.hi - n.disk.lo for n in self.cache.disk_nodes())


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bytes as a numpy array of same-size integers (bfloat16 included). On the
    CPU the tier copies K/V with numpy: one thread, where a torch op of a few MB is an OpenMP
    region that stalls when the cores are busy."""
    return t.view(_SAME_SIZE_INT[t.element_size()]).numpy()


def fingerprint(model_path: str, dtype: torch.dtype, pool: KVPool) -> str:
    """A hash of everything that changes the K/V bytes of a token sequence: the model's files
    (weights, config with its rope settings, tokenizer), the weight and KV dtypes, and the pool's
    layout. Large files are sampled (size, first and last MiB), not read whole."""
    h = hashlib.sha256()
    settings = {
        "layout": LAYOUT_VERSION,
        "dtype": str(dtype),
        "kv_dtype": str(pool.dtype),
        "pool": [pool.num_layers, pool.num_kv_heads, pool.head_dim],
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    root = Path(model_path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for path in files:
        h.update(str(path.relative_to(root) if root.is_dir() else path.name).encode())
        _hash_file(h, path)
    return h.hexdigest()


def _hash_file(h: hashlib._Hash, path: Path, sample: int = 1 << 20) -> None:
    size = path.stat().st_size
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= 2 * sample:
            h.update(f.read())
            return
        h.update(f.read(sample))
        f.seek(size - sample, os.SEEK_SET)
        h.update(f.read(sample))


def open_disk_tier(
    cache_dir: str,
    size_gb: float,
    policy: str,
    model_path: str,
    dtype: torch.dtype,
    cache: RadixCache,
    pool: KVPool,
) -> DiskTier:
    """The disk tier of an engine, attached to its cache (the tree is rebuilt from disk)."""
    shape = (pool.num_layers, 2, pool.num_kv_heads, pool.head_dim)
    store = DiskStore(
        cache_dir, fingerprint(model_path, dtype, pool), int(size_gb * 1e9), shape, pool.dtype
    )
    tier = DiskTier(store, pool, policy)
    tier.attach(cache)
    return tier
