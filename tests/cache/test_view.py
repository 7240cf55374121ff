"""The tree view against the tree: who sees which node, sizes, hits, and the node bound."""

from __future__ import annotations

from radixlm.cache.public import PublicPrefixes
from radixlm.cache.view import tree_view
from radixlm.tenancy import request_salt
from tests.cache.test_radix import make, nodes
from tests.cache.test_salt import serve


def build() -> tuple:
    alloc, cache = make(num_slots=64)
    public = PublicPrefixes()
    public.add([1, 2, 3])
    acme, beta = request_salt("acme", None), request_salt("beta", "s1")
    serve(cache, [1, 2, 3, 10, 11], acme, 3)
    serve(cache, [1, 2, 3, 20], beta, 3)
    serve(cache, [30, 31, 32], beta, 0)
    serve(cache, [1, 2, 3, 4, 5, 6], None, 0)  # an admin's unsalted prompt
    return cache, public


def test_admin_sees_every_node_with_its_tenant() -> None:
    cache, public = build()
    view = tree_view(cache, public, None, max_nodes=100)
    assert view.visible_nodes == len(list(nodes(cache)))
    assert view.visible_tokens == cache.total_size()
    by_preview = {tuple(n.preview_ids): n for n in view.nodes}
    assert by_preview[(1, 2, 3)].tenant is None
    assert by_preview[(10, 11)].tenant == "acme"
    assert by_preview[(20,)].tenant == "beta" and by_preview[(30, 31, 32)].tenant == "beta"
    assert by_preview[(4, 5, 6)].tenant is None
    assert by_preview[(1, 2, 3)].tokens == 3 and by_preview[(1, 2, 3)].depth == 3


def test_a_user_sees_its_own_nodes_and_public_ones_only() -> None:
    cache, public = build()
    view = tree_view(cache, public, "acme", max_nodes=100)
    assert sorted(tuple(n.preview_ids) for n in view.nodes) == [(1, 2, 3), (10, 11)]
    assert view.visible_tokens == 5
    beta = tree_view(cache, public, "beta", max_nodes=100)
    assert sorted(tuple(n.preview_ids) for n in beta.nodes) == [(1, 2, 3), (20,), (30, 31, 32)]
    assert tree_view(cache, public, "nobody", max_nodes=100).nodes[0].preview_ids == [1, 2, 3]


def test_hits_sum_over_subtrees_and_the_bound_summarises_the_rest() -> None:
    cache, public = build()
    for n in nodes(cache):
        n.hits = 1
    full = tree_view(cache, public, None, max_nodes=100)
    top = next(n for n in full.nodes if n.preview_ids == [1, 2, 3])
    assert top.hits == 4  # itself, acme's, beta's and the admin's branch
    small = tree_view(cache, public, None, max_nodes=1)
    assert len(small.nodes) == 1
    (only,) = small.nodes
    assert only.preview_ids == [1, 2, 3]  # the biggest subtree first
    assert only.more_nodes == 3 and only.more_tokens == 2 + 1 + 3
    assert small.visible_nodes == full.visible_nodes
