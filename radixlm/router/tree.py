"""A worker's radix tree as the router mirrors it: token sequences only, no slots, no torch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from radixlm.core.messages import CacheEvent, CacheEventBatch


@dataclass(slots=True, eq=False)
class _Node:
    key: list[int]
    children: dict[int, _Node] = field(default_factory=dict)


def _common_len(key: list[int], ids: Sequence[int], start: int) -> int:
    n = min(len(key), len(ids) - start)
    if key[:n] == list(ids[start : start + n]):
        return n
    i = 0
    while key[i] == ids[start + i]:
        i += 1
    return i


class MirrorTree:
    """The set of token sequences a worker's cache holds, replayed from its cache events.

    Invariant: after applying every batch the worker published, `match(ids)` is the length of
    the worker's own longest cached prefix of ids.
    """

    def __init__(self) -> None:
        self.root = _Node([])
        self.num_tokens = 0

    def match(self, ids: Sequence[int]) -> int:
        """Length of the longest prefix of ids the tree holds."""
        node, pos = self.root, 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                break
            m = _common_len(child.key, ids, pos)
            pos += m
            if m < len(child.key):
                break
            node = child
        return pos

    def insert(self, ids: Sequence[int]) -> None:
        """Hold ids (and so all its prefixes)."""
        node, pos = self.root, 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                node.children[ids[pos]] = _Node(list(ids[pos:]))
                self.num_tokens += len(ids) - pos
                return
            m = _common_len(child.key, ids, pos)
            if m < len(child.key):
                upper = _Node(child.key[:m], {child.key[m]: child})
                child.key = child.key[m:]
                node.children[ids[pos]] = upper
                child = upper
            node, pos = child, pos + m

    def remove(self, path: Sequence[int], keep: int) -> None:
        """Drop every sequence longer than keep that starts with path[: keep + 1]; an empty path
        drops everything (a flush)."""
        if not path:
            self.clear()
            return
        if keep >= len(path):
            return
        node, pos = self.root, 0
        while True:
            child = node.children.get(path[pos])
            if child is None:
                return
            if pos + len(child.key) > keep:
                cut = keep - pos  # tokens of child's edge that stay
                if path[pos : keep + 1] != child.key[: cut + 1]:
                    return  # the mirror never held the removed sequences
                dropped = len(child.key) - cut + _size(child.children.values())
                if cut == 0:
                    del node.children[path[pos]]
                else:
                    child.key = child.key[:cut]
                    child.children = {}
                self.num_tokens -= dropped
                return
            if list(path[pos : pos + len(child.key)]) != child.key:
                return
            node, pos = child, pos + len(child.key)

    def clear(self) -> None:
        """Hold nothing."""
        self.root = _Node([])
        self.num_tokens = 0

    def load(self, snapshot: list[tuple[int, list[int]]]) -> None:
        """Replace the tree by a worker's snapshot ((parent index or -1, key) in preorder)."""
        self.clear()
        nodes: list[_Node] = []
        for parent, key in snapshot:
            node = _Node(list(key))
            (self.root if parent < 0 else nodes[parent]).children[key[0]] = node
            nodes.append(node)
            self.num_tokens += len(key)

    def apply(self, event: CacheEvent) -> None:
        """Replay one cache event."""
        kind, ids, depth = event
        if kind == "insert":
            self.insert(ids)
        elif kind == "remove":
            self.remove(ids, depth)
        else:
            raise ValueError(f"unknown cache event {kind!r}")

    def apply_batch(self, batch: CacheEventBatch) -> None:
        """Replay a batch: its snapshot if it has one, then its events."""
        if batch.snapshot is not None:
            self.load(batch.snapshot)
        for event in batch.events:
            self.apply(event)


def _size(nodes: Iterable[_Node]) -> int:
    total, stack = 0, list(nodes)
    while stack:
        node = stack.pop()
        total += len(node.key)
        stack.extend(node.children.values())
    return total
