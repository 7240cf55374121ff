"""Drafts from the radix tree: the cached continuation of a sequence, and suffix matches.

Every walk over tree nodes for drafting is in this module. A node is read only if `visible`
says so (a node of the asking request's own namespace: its salt, or the shared namespace for an
unsalted request), so a draft never shows one tenant another's text, nor a tenant's text to an
unsalted request. Drafting reads token ids only: it never locks, splits or touches a node's
LRU time, and a node whose K/V lives elsewhere drafts as well as any.
"""

from __future__ import annotations

from radixlm.cache.radix import RadixCache, TreeNode, common_prefix_len, namespace_key

# N-gram sizes indexed for suffix matches over the tree, longest tried first.
SUFFIX_NGRAMS = (4, 3, 2)
# Places kept per n-gram, the latest: older ones may have been evicted, or end a sequence.
PLACES_PER_NGRAM = 4


def visible(node: TreeNode, salt: str | None) -> bool:
    """Whether a draft for a request of this salt may read node: only its own namespace's."""
    return node.salt == salt


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
    node: TreeNode,
    ids: list[int],
    start: int,
    k: int,
    salt: str | None = None,
    public_len: int = 0,
) -> list[int]:
    """Up to k tokens that follow ids in the tree, where ids[:start] is node's path (a request's
    locked node): the rest of ids is walked down from there in the request's namespaces (as
    RadixCache.match_prefix walks them); [] if the tree diverges from ids."""
    pos = start
    while pos < len(ids):
        key, end = namespace_key(ids, pos, salt, public_len)
        child = node.children.get(key)
        if child is None:
            return []
        m = common_prefix_len(child.key, ids, pos, end)
        if m < len(child.key):
            if pos + m < len(ids):
                return []
            return continuation(child, child.depth - len(child.key) + m, k, salt)
        node, pos = child, pos + m
    return continuation(node, node.depth, k, salt)


class SuffixIndex:
    """The n-grams of the tree's token paths -> where their latest few insertions end (a node
    whose path holds one, and the depth just after it); kept as leaves are inserted, and checked
    on lookup: a place whose node was evicted is dropped then. Rebuilt from the tree when stale
    places outnumber the tree's tokens."""

    def __init__(self, cache: RadixCache) -> None:
        self.cache = cache
        self._entries: dict[tuple[int, ...], list[tuple[TreeNode, int]]] = {}
        self._num_places = 0
        cache.on_new_leaf = self.add

    def __len__(self) -> int:
        """Places indexed (evicted ones included until a lookup or a rebuild drops them)."""
        return self._num_places

    def add(self, leaf: TreeNode) -> None:
        """Index a new leaf (RadixCache.on_new_leaf)."""
        self._index(leaf)
        if self._num_places > 2 * len(SUFFIX_NGRAMS) * self.cache.total_size() + 4096:
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
                    places = self._entries.setdefault(tuple(tokens[i + 1 - n : i + 1]), [])
                    places.append((leaf, depth))
                    self._num_places += 1
                    if len(places) > PLACES_PER_NGRAM:
                        del places[0]
                        self._num_places -= 1

    def rebuild(self) -> None:
        """Forget every entry and index the tree's paths again (drops evicted nodes' entries)."""
        self._entries.clear()
        self._num_places = 0
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
            places = self._entries.get(tuple(ids[-n:]))
            if not places:
                continue
            for node, depth in reversed(places):
                out = continuation(node, depth, k, salt) if node.parent is not None else []
                if out:
                    return out
            live = [(node, depth) for node, depth in places if node.parent is not None]
            self._num_places -= len(places) - len(live)
            places[:] = live  # evicted (or flushed) since
        return []
