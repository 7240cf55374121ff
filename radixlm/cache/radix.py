"""RadixAttention's prefix cache: a radix tree over token ids whose nodes own KV slots."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from radixlm.cache.pool import SlotAllocator

# A node's key among its parent's children: its first token, with its salt if it has one.
ChildKey = int | tuple[str, int]


@dataclass(slots=True, eq=False)
class TreeNode:
    """One edge of the tree: a run of token ids and the slots holding their K/V."""

    key: list[int]
    value: torch.Tensor  # int64 slot ids, len(value) == len(key)
    # None for the root and for evicted nodes. Not in repr, which would print the whole tree.
    parent: TreeNode | None = field(repr=False)
    depth: int  # tokens from the root through the end of key; a split keeps it for this node
    uid: int  # tie-break for equal access times, so the heap never compares nodes
    # Keyed by child_key(child): key[0] in the shared namespace, (salt, key[0]) for a salted child.
    children: dict[ChildKey, TreeNode] = field(default_factory=dict, repr=False)
    # Number of locks held on this node or any descendant; a locked node is never evicted.
    lock_ref: int = 0
    last_access: int = 0
    # The namespace of this node's tokens: None is shared by every request; a salted node is
    # matched only by requests with the same salt, and all its descendants carry that salt.
    salt: str | None = None
    pin_ref: int = 0  # pins on this node or any descendant (each pin also holds a lock)
    hits: int = 0  # admissions whose match ended at this node (a subtree's sum counts its uses)
    # Tiers: in the pool (value holds the slots), on disk (disk is the tier's handle), or both.
    # Pool-resident nodes form a subtree from the root: a disk-only node's children are too.
    in_pool: bool = True
    disk: Any = None

    @property
    def child_key(self) -> ChildKey:
        """This node's key in its parent's children."""
        return self.key[0] if self.salt is None else (self.salt, self.key[0])


@dataclass(slots=True)
class MatchResult:
    """The longest cached prefix of a token sequence: its slots and the node where it ends."""

    # int64, one slot per matched token; may share memory with the tree, so read only.
    slots: torch.Tensor
    node: TreeNode  # deepest matched node; the root when nothing matched
    # Tokens after the match that disk-only nodes hold (load_prefix brings them back).
    on_disk: int = 0


def common_prefix_len(key: list[int], ids: list[int], start: int, end: int | None = None) -> int:
    """Length of the common prefix of key and ids[start:end]."""
    n = min(len(key), (len(ids) if end is None else end) - start)
    # Slice comparison runs in C; bisecting on it beats an element loop by 3-10x on long runs.
    if key[:n] == ids[start : start + n]:
        return n
    lo, hi = 0, n  # invariant: key[:lo] matches, the first mismatch is before hi
    while hi - lo > 16:
        mid = (lo + hi) // 2
        if key[lo:mid] == ids[start + lo : start + mid]:
            lo = mid
        else:
            hi = mid
    while key[lo] == ids[start + lo]:
        lo += 1
    return lo


class EvictionTier(Protocol):
    """A lower tier under the pool (the disk tier): asked about each node the pool lets go of."""

    def keep(self, node: TreeNode) -> bool:
        """Called before an unlocked pool leaf's slots are freed: True if the node's K/V now
        lives in the tier (the node stays in the tree, disk-only), False to drop it."""
        ...

    def split(self, handle: Any, m: int) -> tuple[Any, Any]:
        """The handles of a node's first m tokens and of the rest, when the node is split."""
        ...

    def drop(self, node: TreeNode) -> None:
        """node's copy in the tier is no longer needed (the node left the tree or the tier)."""
        ...

    def read(self, node: TreeNode) -> torch.Tensor | None:
        """node's K/V from the tier, None if it is lost (the node is then dropped: a miss)."""
        ...

    def load(self, slots: torch.Tensor, data: torch.Tensor) -> None:
        """Write K/V read from the tier into the pool at slots."""
        ...


# Told of every change to the set of cached token sequences: ("insert", ids, held) when the
# tree comes to hold ids (it held ids[:held] before), ("remove", path, keep) when it drops every
# sequence that extends path[: keep + 1] (an eviction; a flush is ("remove", [], 0)). The lists
# are the listener's own. Splits change no sequence and are not reported.
ChangeListener = Callable[[str, list[int], int], None]


class RadixCache:
    """Prefix cache over the slot allocator; every slot it holds is in exactly one node."""

    def __init__(self, allocator: SlotAllocator, disable: bool = False) -> None:
        self.allocator = allocator
        self.disable = disable
        self.on_change: ChangeListener | None = None
        self.tier: EvictionTier | None = None  # where evicted K/V goes instead of vanishing
        self.evicted_tokens = 0  # tokens freed by evict() since the start
        # Told of each new leaf, the node that holds newly cached tokens (a draft index).
        self.on_new_leaf: Callable[[TreeNode], None] | None = None
        self._ids = itertools.count()
        self._clock = itertools.count(1)
        self._empty = torch.empty(0, dtype=torch.int64, device=allocator.device)
        # The root outlives flushes: requests that matched nothing hold it as their node.
        self.root = TreeNode(key=[], value=self._empty, parent=None, depth=0, uid=next(self._ids))
        self.root.lock_ref = 1  # never evicted, never counted in the sizes
        self._reset()

    def _reset(self) -> None:
        self.root.children.clear()
        self._evictable_size = 0  # tokens in nodes with lock_ref == 0
        self._protected_size = 0  # tokens in nodes with lock_ref > 0
        self._num_nodes = 0  # excluding the root
        # Min-heap of (last_access, uid, node) over evictable leaves, with lazy deletion: an
        # entry may be stale (node locked, grown children, evicted, or touched since); evict()
        # checks on pop. Every node that becomes an evictable leaf gets a fresh entry.
        self._heap: list[tuple[int, int, TreeNode]] = []

    @property
    def evictable_size(self) -> int:
        """Tokens held by unlocked nodes: what evict() can free."""
        return self._evictable_size

    @property
    def protected_size(self) -> int:
        """Tokens held by locked nodes."""
        return self._protected_size

    def total_size(self) -> int:
        """Slots held by the tree."""
        return self._evictable_size + self._protected_size

    def match_prefix(
        self, ids: Sequence[int], *, salt: str | None = None, public_len: int = 0
    ) -> MatchResult:
        """Longest cached prefix of ids; splits the node the match ends inside; refreshes LRU.

        With a salt, only ids[:public_len] are matched in the shared namespace and the rest among
        nodes of that salt, so requests with different salts share nothing past public_len.
        """
        if self.disable:
            return MatchResult(self._empty, self.root)
        ids = _as_list(ids)
        node, pos, tick = self.root, 0, next(self._clock)
        values: list[torch.Tensor] = []
        while pos < len(ids):
            if salt is None:  # the unsalted path stays as cheap as it was
                key: ChildKey = ids[pos]
                end: int | None = None
            else:
                key, end = namespace_key(ids, pos, salt, public_len)
            child = node.children.get(key)
            if child is None:
                break
            if not child.in_pool:
                on_disk = _disk_len(child, ids, pos, salt, public_len)
                return MatchResult(_cat(values, self._empty), node, on_disk)
            m = common_prefix_len(child.key, ids, pos, end)
            if m < len(child.key):
                # The upper half has one child, whose first token differs from ids[pos + m]:
                # the next lookup ends the walk.
                child = self._split(child, m)
            child.last_access = tick  # only what matched: an unmatched lower half keeps its age
            values.append(child.value)
            node, pos = child, pos + m
        return MatchResult(_cat(values, self._empty), node)

    def lock(self, node: TreeNode) -> None:
        """Protect node and its ancestors from eviction (one more holder)."""
        while node is not self.root:
            parent = node.parent
            assert parent is not None, "lock() on an evicted node"
            if node.lock_ref == 0:
                self._evictable_size -= len(node.key)
                self._protected_size += len(node.key)
            node.lock_ref += 1
            node = parent

    def pin(self, node: TreeNode) -> None:
        """Lock node's path for a pin (shown as pinned); undone by unpin(node)."""
        self.lock(node)
        while node is not self.root:
            node.pin_ref += 1
            assert node.parent is not None
            node = node.parent

    def unpin(self, node: TreeNode) -> None:
        """Drop one pin taken by pin(node)."""
        walk = node
        while walk is not self.root:
            assert walk.parent is not None and walk.pin_ref > 0, "unpin() without a matching pin()"
            walk.pin_ref -= 1
            walk = walk.parent
        self.unlock(node)

    def unlock(self, node: TreeNode) -> None:
        """Drop one lock taken by lock(node)."""
        while node is not self.root:
            parent = node.parent
            assert parent is not None and node.lock_ref > 0, "unlock() without a matching lock()"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable_size += len(node.key)
                self._protected_size -= len(node.key)
                if not _pool_children(node):
                    self._push(node)
            node = parent

    def cache_finished(
        self,
        ids: Sequence[int],
        slots: torch.Tensor,
        node: TreeNode,
        *,
        salt: str | None = None,
        public_len: int = 0,
    ) -> None:
        """Insert a finished request's tokens and take ownership of all its slots; drops its lock on node.

        ids are the tokens with K/V, slots their slots; slots[: node.depth] are the tree's own
        (node is the request's locked node). Afterwards the caller owns none of these slots.
        salt and public_len must be those node was matched with (see match_prefix).
        """
        ids = _as_list(ids)
        assert len(ids) == slots.numel(), "one slot per token"
        if self.disable:
            self.allocator.free(slots[node.depth :])
        else:
            prefix_len, _ = self._insert(ids, slots, salt, public_len)
            assert prefix_len >= node.depth, "ids must extend the locked node's prefix"
            # The tree already held ids[:prefix_len]; the request's own copies are duplicates.
            self.allocator.free(slots[node.depth : prefix_len])
        self.unlock(node)

    def cache_unfinished(
        self,
        ids: Sequence[int],
        slots: torch.Tensor,
        node: TreeNode,
        *,
        salt: str | None = None,
        public_len: int = 0,
    ) -> MatchResult:
        """Share a running request's computed prefix; returns its new slots and node, which the tree locks.

        As for cache_finished, slots[: node.depth] are the tree's own. Afterwards the request
        must use the returned slots for ids (duplicates it held were freed) and the returned
        node; the lock moves from node to the returned node. Slots past len(ids) stay private.
        """
        ids = _as_list(ids)
        assert len(ids) == slots.numel(), "one slot per token"
        if self.disable:
            return MatchResult(slots, node)
        prefix_len, new_node = self._insert(ids, slots, salt, public_len)
        assert prefix_len >= node.depth, "ids must extend the locked node's prefix"
        self.allocator.free(slots[node.depth : prefix_len])
        self.lock(new_node)
        self.unlock(node)
        return MatchResult(self._path_slots(new_node), new_node)

    def evict(self, num_tokens: int) -> int:
        """Free unlocked leaves, least recently used first, until num_tokens are freed or none is
        left; returns the number freed. With a tier, a leaf it keeps stays in the tree, disk-only
        (a pool leaf is a node with no child in the pool)."""
        freed = 0
        chunks: list[torch.Tensor] = []
        while freed < num_tokens and self._heap:
            access, _, node = heapq.heappop(self._heap)
            parent = node.parent
            if parent is None or not node.in_pool or node.lock_ref > 0 or _pool_children(node):
                continue  # stale entry: evicted, grew children, or locked since pushed
            if access < node.last_access:
                self._push(node)  # touched since pushed: requeue at its real age
                continue
            chunks.append(node.value)
            freed += len(node.key)
            self.evicted_tokens += len(node.key)
            self._evictable_size -= len(node.key)
            if self.tier is not None and self.tier.keep(node):
                node.value, node.in_pool = self._empty, False
                self._push_if_leaf(parent)
            else:
                self.remove(node)
        if chunks:
            self.allocator.free(torch.cat(chunks))
        return freed

    def remove(self, node: TreeNode) -> None:
        """Drop node and its subtree, which must hold no pool slot but node's own (the caller
        frees those): an evicted pool leaf, or a disk-only node the tier lets go of."""
        parent = node.parent
        assert parent is not None and node.lock_ref == 0
        if self.on_change is not None and node.salt is None:
            self.on_change("remove", self._path_key(node), parent.depth)
        del parent.children[node.child_key]
        stack = [node]
        while stack:
            n = stack.pop()
            assert n is node or not n.in_pool, "a pool node under a removed node"
            if n.disk is not None and self.tier is not None:
                self.tier.drop(n)
            n.parent = None
            self._num_nodes -= 1
            stack.extend(n.children.values())
        self._push_if_leaf(parent)

    def load_prefix(
        self, ids: Sequence[int], *, salt: str | None = None, public_len: int = 0
    ) -> int:
        """Bring the disk-only nodes on ids' cached path (namespaced as in match_prefix) back
        into the pool, as far as free and evictable slots allow, so that match_prefix finds
        them; returns the tokens loaded. A node whose K/V the tier lost is dropped with its
        subtree (a miss, recomputed)."""
        if self.tier is None or self.disable:
            return 0
        ids = _as_list(ids)
        node, pos = self.root, 0
        path: list[TreeNode] = []
        while pos < len(ids):
            key, end = namespace_key(ids, pos, salt, public_len)
            child = node.children.get(key)
            if child is None:
                break
            m = common_prefix_len(child.key, ids, pos, end)
            if m < len(child.key):
                child = self._split(child, m)
            if not child.in_pool:
                path.append(child)
            node, pos = child, pos + m
        if not path:
            return 0
        anchor = path[0].parent
        assert anchor is not None
        need = sum(len(n.key) for n in path)
        self.lock(anchor)  # the pool prefix the loaded nodes hang from stays
        try:
            if self.allocator.num_free < need:
                self.evict(need - self.allocator.num_free)
            loaded = 0
            for n in path:
                if n.parent is None or self.allocator.num_free < len(n.key):
                    break  # dropped by the evictions above (the tier's size bound), or no room
                data = self.tier.read(n)
                if data is None:
                    self.remove(n)
                    break
                slots = self.allocator.alloc(len(n.key))
                assert slots is not None
                self.tier.load(slots, data)
                self._adopt(n, slots)
                loaded += len(n.key)
        finally:
            self.unlock(anchor)
        return loaded

    def attach_disk(
        self, prefix: list[int], tokens: list[int], handle: Any, salt: str | None = None
    ) -> TreeNode | None:
        """Add a disk-only node for tokens after prefix, holding the tier's handle (a tier
        rebuilding the tree at start); None, with nothing changed, unless the tree holds prefix
        and no node after it starts with tokens[0]. A salted node's path runs through shared
        nodes, then nodes of its salt."""
        node, pos = self.root, 0
        salted = False
        while pos < len(prefix):
            if salt is not None and (salted or (salt, prefix[pos]) in node.children):
                key: ChildKey = (salt, prefix[pos])
                salted = True
            else:
                key = prefix[pos]
            child = node.children.get(key)
            if child is None:
                return None
            m = common_prefix_len(child.key, prefix, pos)
            if m < len(child.key):
                if pos + m < len(prefix) or not tokens or child.key[m] == tokens[0]:
                    return None
                child = self._split(child, m)
            node, pos = child, pos + m
        if not tokens or (tokens[0] if salt is None else (salt, tokens[0])) in node.children:
            return None
        if salt is None and node.salt is not None:
            return None  # an unsalted node never hangs under a salted one
        leaf = self._new_node(list(tokens), self._empty, node, next(self._clock), salt)
        leaf.in_pool, leaf.disk = False, handle
        return leaf

    def path_key(self, node: TreeNode) -> list[int]:
        """The token ids from the root through the end of node's key."""
        return self._path_key(node)

    def preorder(self) -> Iterator[TreeNode]:
        """Every node but the root, each before its children."""
        return self._nodes()

    def disk_nodes(self) -> Iterator[TreeNode]:
        """Every node with a copy in the tier (for the tier's own bookkeeping)."""
        return (n for n in self._nodes() if n.disk is not None)

    def flush(self) -> bool:
        """Return every slot of the tree to the allocator; False, with nothing changed, if any
        node is locked. Without a tier the tree is dropped; with one, every node is evicted as
        under memory pressure, so what the tier holds stays, disk-only (its blocks outlive a
        flush, as SGLang's storage tier does; `clear_tier` deletes them)."""
        if self._protected_size > 0:
            return False
        if self.tier is not None:
            self.evict(self._evictable_size)
            return True
        self.allocator.free(self.all_slots())
        if self.on_change is not None and self.root.children:
            self.on_change("remove", [], 0)
        for node in self._nodes():
            node.parent = None  # handles still held by callers now read as evicted
        self._reset()
        return True

    def clear_tier(self) -> None:
        """Delete every disk copy: disk-only nodes leave the tree with their subtrees (all
        disk-only), pool nodes keep their slots."""
        if self.tier is None:
            return
        for node in list(self._nodes()):
            if node.parent is None or node.disk is None:
                continue  # removed with an ancestor just now, or in the pool alone
            if node.in_pool:
                self.tier.drop(node)
            else:
                self.remove(node)

    def snapshot(self) -> list[tuple[int, list[int]]]:
        """The shared namespace's shape as (parent index or -1 for the root, key) in preorder:
        every cached unsalted token sequence is a path of it (what a mirror of the tree starts
        from; salted nodes are no one else's to route by, and are left out as they are from
        on_change)."""
        out: list[tuple[int, list[int]]] = []
        stack = [(child, -1) for child in self.root.children.values() if child.salt is None]
        while stack:
            node, parent = stack.pop()
            out.append((parent, list(node.key)))
            index = len(out) - 1
            stack.extend((c, index) for c in node.children.values() if c.salt is None)
        return out

    def all_slots(self) -> torch.Tensor:
        """Every slot id the tree holds (for tests and debugging)."""
        return _cat([node.value for node in self._nodes()], self._empty)

    def _insert(
        self, ids: list[int], slots: torch.Tensor, salt: str | None = None, public_len: int = 0
    ) -> tuple[int, TreeNode]:
        """Make the tree hold ids (namespaced as in match_prefix); returns how many leading
        tokens it already held and the node ending at len(ids)."""
        node, pos, tick = self.root, 0, next(self._clock)
        held: int | None = None
        pool_end: int | None = (
            None  # where the pool's part ended, once the walk meets a disk-only node
        )
        while pos < len(ids):
            if salt is None:
                key: ChildKey = ids[pos]
                end = len(ids)
            else:
                key, end = namespace_key(ids, pos, salt, public_len)
            child = node.children.get(key)
            if child is None:
                if held is None:
                    held = pos
                    shared_end = len(ids) if salt is None else min(public_len, len(ids))
                    if self.on_change is not None and pos < shared_end:
                        self.on_change("insert", ids[:shared_end], pos)
                # Cloned: the caller's tensor is often a view of a table it will overwrite.
                salted = None if isinstance(key, int) else salt
                node = self._new_node(ids[pos:end], slots[pos:end].clone(), node, tick, salted)
                self._evictable_size += len(node.key)
                pos = end
                continue
            m = common_prefix_len(child.key, ids, pos, end)
            if m < len(child.key):
                child = self._split(child, m)  # ids end or branch off inside this edge
            if not child.in_pool:  # the caller computed these tokens: the node takes its slots
                pool_end = pos if pool_end is None else pool_end
                self._adopt(child, slots[pos : pos + m].clone())
            child.last_access = tick
            node, pos = child, pos + m
        if held is None:
            return (pos if pool_end is None else pool_end), node
        self._push(node)  # the new leaf
        if self.on_new_leaf is not None:
            self.on_new_leaf(node)
        return (held if pool_end is None else pool_end), node

    def _adopt(self, node: TreeNode, slots: torch.Tensor) -> None:
        """A disk-only node (never locked) is in the pool again, at slots, which it now owns."""
        node.value, node.in_pool = slots, True
        self._evictable_size += len(node.key)
        self._push(node)

    def _split(self, node: TreeNode, m: int) -> TreeNode:
        """Cut node's edge after m tokens; returns the new upper node. node keeps its identity, depth, locks and heap entry."""
        parent = node.parent
        assert parent is not None and 0 < m < len(node.key)
        upper = self._new_node(node.key[:m], node.value[:m], parent, node.last_access, node.salt)
        upper.lock_ref, upper.pin_ref = node.lock_ref, node.pin_ref
        upper.in_pool = node.in_pool
        if node.disk is not None:
            assert self.tier is not None
            upper.disk, node.disk = self.tier.split(node.disk, m)
        node.key = node.key[m:]
        node.value = node.value[m:]
        node.parent = upper
        upper.children[node.child_key] = node
        return upper

    def _new_node(
        self,
        key: list[int],
        value: torch.Tensor,
        parent: TreeNode,
        tick: int,
        salt: str | None = None,
    ) -> TreeNode:
        node = TreeNode(key, value, parent, parent.depth + len(key), next(self._ids), salt=salt)
        node.last_access = tick
        parent.children[node.child_key] = node
        self._num_nodes += 1
        return node

    def _push_if_leaf(self, node: TreeNode) -> None:
        """Queue node for eviction if it just became an evictable pool leaf."""
        if node.lock_ref == 0 and node.in_pool and not _pool_children(node):
            self._push(node)

    def _push(self, node: TreeNode) -> None:
        heapq.heappush(self._heap, (node.last_access, node.uid, node))
        # Stale entries pile up when nothing is evicted for a long time; rebuild from the
        # current evictable leaves once they dominate, which keeps pushes amortised O(log n).
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._heap = [
                (n.last_access, n.uid, n)
                for n in self._nodes()
                if n.in_pool and not _pool_children(n) and n.lock_ref == 0
            ]
            heapq.heapify(self._heap)

    def _path_key(self, node: TreeNode) -> list[int]:
        keys: list[list[int]] = []
        while node is not self.root:
            keys.append(node.key)
            assert node.parent is not None
            node = node.parent
        return [t for key in reversed(keys) for t in key]

    def _path_slots(self, node: TreeNode) -> torch.Tensor:
        values: list[torch.Tensor] = []
        while node is not self.root:
            values.append(node.value)
            assert node.parent is not None
            node = node.parent
        values.reverse()
        return _cat(values, self._empty)

    def _nodes(self) -> Iterator[TreeNode]:
        """Every node but the root."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())


def namespace_key(
    ids: list[int], pos: int, salt: str | None, public_len: int
) -> tuple[ChildKey, int]:
    """The children key for ids[pos] and where the namespace it is in ends: the shared
    namespace up to public_len for a salted request (everywhere for an unsalted one), then the
    salt's."""
    if salt is None:
        return ids[pos], len(ids)
    if pos < public_len:
        return ids[pos], min(public_len, len(ids))
    return (salt, ids[pos]), len(ids)


def _disk_len(node: TreeNode, ids: list[int], pos: int, salt: str | None, public_len: int) -> int:
    """How many of ids[pos:] the disk-only path from node (whose key continues ids at pos)
    holds; read only (nothing split, no LRU touched). A disk-only node's children are too."""
    start = pos
    child: TreeNode | None = node
    while child is not None:
        _, end = namespace_key(ids, pos, salt, public_len)
        m = common_prefix_len(child.key, ids, pos, end)
        pos += m
        if m < len(child.key) or pos >= len(ids):
            break
        child = child.children.get(namespace_key(ids, pos, salt, public_len)[0])
    return pos - start


def _pool_children(node: TreeNode) -> bool:
    """Whether any child of node is in the pool (a node without is a pool leaf)."""
    return any(child.in_pool for child in node.children.values())


def _as_list(ids: Sequence[int]) -> list[int]:
    # Keys are lists, and a list never compares equal to a tuple slice.
    if isinstance(ids, torch.Tensor):
        raise TypeError("token ids must be a Sequence[int], not a tensor; use .tolist()")
    return ids if isinstance(ids, list) else list(ids)


def _cat(values: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    if not values:
        return empty
    return values[0] if len(values) == 1 else torch.cat(values)
