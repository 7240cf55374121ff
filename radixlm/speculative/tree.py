"""Drafts from the radix tree: the cached continuation of a sequence, and suffix matches.

Every walk over tree nodes for drafting is in this module. A node is read only if `visible`
says so (`salt`: a tenant's cache key; None reads every node), so a draft never shows one
tenant another's text. Drafting reads token ids only: it never locks, splits or touches a node's
LRU time, and a node whose K/V lives elsewhere drafts as well as any.
"""

from __future__ import annotations

from radixlm.cache.radix import RadixCache, TreeNode, common_prefix_len

# N-gram sizes indexed for suffix matches over the tree, longest tried first.
SUFFIX_NGRAMS = (4, 3, 2)


def visible(node: TreeNode, salt: str | None) -> bool:
    """Whether a draft may read node: only a tenant's own nodes (no salt: every node)."""
    return salt is None or getattr(node, "salt", None) == salt


def continuation(node: TreeNode, depth: int, k: int, salt: str | None = None) -> list[int]:
    """Up to k tokens the tree holds after the first `depth` tokens of node's path (depth <=
    node.depth), following the most recently used child at each branch."""
    while node.parent is not None and node.parent.depth > depth:
        node = node.parent  # the node whose edge holds the token at position depth
    out: list[int] = []
    if node.parent is not None and depth < node.depth:
        if not visible(node, salt):
            return []
        offset = depth - node.parent.depth
        out = node.key[offset : offset + k]
    while len(out) < k:
        children = [c for c in node.children.values() if visible(c, salt)]
        if not children:
            break
        node = max(children, key=lambda c: c.last_access)
        out += node.key[: k - len(out)]
    return out


def cached_continuation(
    node: TreeNode, ids: list[int], start: int, k: int, salt: str | None = None
) -> list[int]:
    """Up to k tokens that follow ids in the tree, where ids[:start] is node's path (a request's
    locked node): the rest of ids is walked down from there; [] if the tree diverges from ids."""
    pos = start
    while pos < len(ids):
        child = node.children.get(ids[pos])
        if child is None or not visible(child, salt):
            return []
        m = common_prefix_len(child.key, ids, pos)
        if m < len(child.key):
            if pos + m < len(ids):
                return []
            return continuation(child, child.depth - len(child.key) + m, k, salt)
        node, pos = child, pos + m
    return continuation(node, node.depth, k, salt)


class SuffixIndex:
    """The n-grams of the tree's token paths -> where their latest insertion ends (a node whose
    path holds it, and the depth just after it); kept as leaves are inserted, and checked on
    lookup: an entry whose node was evicted is dropped then. Rebuilt from the tree when stale
    entries outnumber the tree's tokens."""

    def __init__(self, cache: RadixCache) -> None:
        self.cache = cache
        self._entries: dict[tuple[int, ...], tuple[TreeNode, int]] = {}
        cache.on_new_leaf = self.add

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, leaf: TreeNode) -> None:
        """Index a new leaf (RadixCache.on_new_leaf)."""
        self._index(leaf)
        if len(self._entries) > 4 * len(SUFFIX_NGRAMS) * self.cache.total_size() + 4096:
            self.rebuild()

    def _index(self, leaf: TreeNode) -> None:
        """Index the n-grams that end inside leaf's edge (reading back into its ancestors)."""
        assert leaf.parent is not None
        back = max(SUFFIX_NGRAMS) - 1
        before: list[int] = []
        node = leaf.parent
        while len(before) < back and node.parent is not None:
            before = node.key[-back:] + before
            node = node.parent
        before = before[-back:]
        tokens = before + leaf.key
        first = leaf.depth - len(leaf.key)  # depth of leaf.key[0]
        for i in range(len(before), len(tokens)):
            depth = first + i - len(before) + 1  # just after tokens[i]
            for n in SUFFIX_NGRAMS:
                if i + 1 >= n:
                    self._entries[tuple(tokens[i + 1 - n : i + 1])] = (leaf, depth)

    def rebuild(self) -> None:
        """Forget every entry and index the tree's paths again (drops evicted nodes' entries)."""
        self._entries.clear()
        stack = list(self.cache.root.children.values())
        while stack:
            node = stack.pop()
            self._index(node)
            stack.extend(node.children.values())

    def draft(self, ids: list[int], k: int, salt: str | None = None) -> list[int]:
        """Up to k tokens that followed the longest indexed suffix of ids in the tree."""
        for n in SUFFIX_NGRAMS:
            if len(ids) < n:
                continue
            key = tuple(ids[-n:])
            entry = self._entries.get(key)
            if entry is None:
                continue
            node, depth = entry
            if node.parent is None:  # evicted (or flushed) since
                del self._entries[key]
                continue
            out = continuation(node, depth, k, salt)
            if out:
                return out
        return []
