"""A bounded, per-tenant picture of the radix tree, for GET /cache and the live page."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from radixlm.cache.public import PublicPrefixes
from radixlm.cache.radix import RadixCache, TreeNode
from radixlm.tenancy import TreeView, ViewNode, salt_tenant

PREVIEW_TOKENS = 48  # token ids of each node sent for its text preview


@dataclass(slots=True, eq=False)
class _Sub:
    node: TreeNode
    parent_id: int
    nodes: int = 1
    tokens: int = 0
    hits: int = 0


def tree_view(
    cache: RadixCache, public: PublicPrefixes, tenant: str | None, max_nodes: int
) -> TreeView:
    """The tree as tenant sees it: its own salted nodes and the shared nodes inside registered
    public prefixes; tenant None (an admin) sees everything."""
    subs: dict[int, _Sub] = {}
    children: dict[int, list[int]] = {}
    order: list[int] = []
    # (node, parent id, public prefixes the path is still inside of; None: no filter)
    stack: list[tuple[TreeNode, int, list[list[int]] | None]] = [
        (c, -1, None if tenant is None else public.items()) for c in cache.root.children.values()
    ]
    clock = 0
    while stack:
        node, parent_id, inside = stack.pop()
        if inside is not None:
            if node.salt is not None:
                if salt_tenant(node.salt) != tenant:
                    continue
                inside = None  # below one's own salted node, everything is one's own
            else:
                start = node.depth - len(node.key)
                inside = [p for p in inside if p[start : node.depth] == node.key]
                if not inside:
                    continue
        subs[node.uid] = _Sub(node, parent_id, tokens=len(node.key), hits=node.hits)
        children.setdefault(parent_id, []).append(node.uid)
        order.append(node.uid)
        clock = max(clock, node.last_access)
        stack.extend((c, node.uid, inside) for c in node.children.values())
    for uid in reversed(order):  # preorder reversed: children before parents
        sub = subs[uid]
        if sub.parent_id != -1:
            up = subs[sub.parent_id]
            up.nodes += sub.nodes
            up.tokens += sub.tokens
            up.hits += sub.hits
    shown: set[int] = set()
    heap = [(-subs[u].tokens, u) for u in children.get(-1, [])]
    heapq.heapify(heap)
    while heap and len(shown) < max_nodes:
        _, uid = heapq.heappop(heap)
        shown.add(uid)
        for c in children.get(uid, []):
            heapq.heappush(heap, (-subs[c].tokens, c))
    nodes = []
    for uid in order:
        if uid not in shown:
            continue
        sub, node = subs[uid], subs[uid].node
        hidden = [subs[c] for c in children.get(uid, []) if c not in shown]
        nodes.append(
            ViewNode(
                node_id=uid,
                parent_id=sub.parent_id,
                tokens=len(node.key),
                depth=node.depth,
                preview_ids=node.key[:PREVIEW_TOKENS],
                hits=sub.hits,
                last_access=node.last_access,
                lock_ref=node.lock_ref,
                pinned=node.pin_ref > 0,
                tier="pool",
                tenant=None if node.salt is None else _owner(node.salt),
                more_nodes=sum(h.nodes for h in hidden),
                more_tokens=sum(h.tokens for h in hidden),
            )
        )
    top = [subs[u] for u in children.get(-1, [])]
    return TreeView(nodes, clock, sum(s.nodes for s in top), sum(s.tokens for s in top))


def _owner(salt: str) -> str:
    """Who a salted node is shown as belonging to: its tenant, else the salt itself."""
    return salt_tenant(salt) or f"salt:{salt}"
