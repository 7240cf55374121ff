"""The disk tier under the radix tree, with no model: each token's K/V is a function of its
prefix, so every byte that comes back from disk (after splits, restarts, evictions) is checked
against what a recompute would write. The slot invariant and the tier's own (pool nodes form a
subtree from the root; a node not in the pool has a disk copy) are checked after every request."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from radixlm.cache import KVPool, RadixCache, SlotAllocator, TreeNode
from radixlm.cache.disk import DiskDirInUse, DiskStore
from radixlm.cache.disk_tier import DiskTier
from radixlm.core.messages import GenerateRequest
from radixlm.core.params import SamplingParams
from radixlm.core.request import Req
from radixlm.engine.cache_events import CacheEventLog
from radixlm.scheduler.policy import SchedulePolicy

LAYERS, HEADS, DIM = 2, 2, 4
TOKEN_BYTES = LAYERS * 2 * HEADS * DIM * 4


def kv(ids: list[int], start: int, end: int) -> torch.Tensor:
    """The K/V of positions start..end of ids: [layers, 2, heads, n, dim], a function of each
    position's whole prefix (as a model's is)."""
    out = torch.empty(LAYERS, 2, HEADS, end - start, DIM)
    for i in range(start, end):
        h = zlib.crc32(repr(ids[: i + 1]).encode())
        out[:, :, :, i - start] = torch.arange(LAYERS * 2 * HEADS * DIM).view(
            LAYERS, 2, HEADS, DIM
        ) + float(h % 100_003)
    return out


class Harness:
    """A pool, a tree and its disk tier; serve() runs a request the way the scheduler does."""

    def __init__(
        self,
        root: Path,
        slots: int = 64,
        capacity_tokens: int = 10_000,
        policy: str = "write_through",
        fingerprint: str = "fp",
    ) -> None:
        self.pool = KVPool(slots, LAYERS, HEADS, DIM, torch.float32, "cpu")
        self.alloc = SlotAllocator(slots, check=True)
        self.cache = RadixCache(self.alloc)
        store = DiskStore(
            root, fingerprint, capacity_tokens * TOKEN_BYTES, (LAYERS, 2, HEADS, DIM), torch.float32
        )
        self.tier = DiskTier(store, self.pool, policy)
        self.tier.attach(self.cache)

    def serve(self, ids: list[int]) -> int:
        """Load, match, check the matched K/V, compute the rest, cache it; returns the tokens hit."""
        self.cache.load_prefix(ids)
        m = self.cache.match_prefix(ids)
        self.cache.lock(m.node)
        m.node.hits += 1  # as admission counts it
        hit = m.slots.numel()
        if hit:
            assert torch.equal(self.read_pool(m.slots), kv(ids, 0, hit)), "wrong K/V for a hit"
        n = len(ids) - hit
        if self.alloc.num_free < n:
            self.cache.evict(n - self.alloc.num_free)
        new = self.alloc.alloc(n)
        assert new is not None
        self.tier.load(new, kv(ids, hit, len(ids)))  # what the model would write
        self.tier.loaded_tokens -= n
        self.cache.cache_finished(ids, torch.cat([m.slots, new]), m.node)
        self.check()
        return hit

    def read_pool(self, slots: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [
                torch.stack([self.pool.k[layer][:, slots], self.pool.v[layer][:, slots]])
                for layer in range(LAYERS)
            ]
        )

    def nodes(self) -> list[TreeNode]:
        return list(self.cache.preorder())

    def check(self) -> None:
        owned = torch.cat([self.cache.all_slots(), self.alloc.free_slots()])
        assert owned.numel() == self.alloc.num_slots and owned.unique().numel() == owned.numel()
        for node in self.nodes():
            assert node.parent is not None
            if node.in_pool:
                assert node.value.numel() == len(node.key)
                assert node.parent is self.cache.root or node.parent.in_pool
            else:
                assert node.disk is not None and node.value.numel() == 0 and node.lock_ref == 0

    def evict_all(self) -> None:
        self.cache.evict(self.alloc.num_slots)
        self.check()

    def close(self) -> None:
        self.tier.close(timeout_s=10.0)


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 50_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def blocks(root: Path) -> list[Path]:
    return sorted(root.rglob("*.kv"))


def block_of(root: Path, ids: list[int]) -> Path:
    """The block file whose own tokens start with ids'."""
    return next(
        p for p in blocks(root) if f'"tokens":[{ids[0]},{ids[1]},'.encode() in p.read_bytes()
    )


def test_an_evicted_prefix_comes_back_from_disk_with_its_kv(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    a, b = prompt(0, 40), prompt(1, 40)
    assert h.serve(a) == 0
    assert h.serve(b) == 0  # evicts a to disk
    assert not h.cache.match_prefix(a).slots.numel()
    assert h.serve(a) == 40  # loaded back, K/V checked
    assert h.tier.loaded_tokens == 40
    h.close()


def test_a_prefix_ending_inside_a_disk_node_splits_its_block(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    a = prompt(0, 40)
    h.serve(a)
    h.evict_all()
    branch = a[:15] + prompt(2, 10)
    assert h.serve(branch) == 15  # the block's first 15 tokens; the rest stays on disk
    h.evict_all()
    assert h.serve(a) == 40  # both halves of the split block
    assert h.serve(branch) == 25
    h.close()


def test_a_restarted_tier_rebuilds_the_tree_disk_only_and_hits(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    a, b = prompt(0, 30), prompt(1, 20)
    h.serve(a)
    h.serve(a[:10] + b)
    h.close()  # write_through: shutdown writes everything still only in the pool
    h2 = Harness(tmp_path)
    assert h2.nodes() and all(not n.in_pool for n in h2.nodes())
    assert h2.cache.total_size() == 0
    assert h2.serve(a[:10] + b) == 30
    assert h2.serve(a) == 30
    h2.close()


def test_a_corrupted_block_is_a_miss_and_recomputed(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    a, b = prompt(0, 40), prompt(1, 40)
    h.serve(a)
    h.evict_all()
    assert h.tier.store.wait_idle(10.0)
    (path,) = blocks(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one payload byte
    path.write_bytes(bytes(data))
    assert h.serve(a) == 0  # the load failed: a miss, the node dropped, K/V recomputed
    assert not path.exists()
    h.serve(b)
    assert h.serve(a) == 40  # the recomputed copy is good
    h.close()


@pytest.mark.parametrize("damage", ["truncate", "header", "half-written"])
def test_a_damaged_block_is_dropped_at_start(tmp_path: Path, damage: str) -> None:
    h = Harness(tmp_path)
    a, b = prompt(0, 30), prompt(1, 30)
    h.serve(a)
    h.serve(b)
    h.close()
    path = block_of(tmp_path, b)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "header":
        path.write_bytes(raw[:20] + bytes([raw[20] ^ 0x20]) + raw[21:])
    else:  # a write cut short by kill -9 leaves a temporary file, never a renamed block
        path.with_suffix(".tmp").write_bytes(raw[: len(raw) // 3])
        path.unlink()
    h2 = Harness(tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))
    assert h2.serve(b) == 0
    assert h2.serve(a) == 30
    h2.close()


def test_a_second_owner_of_the_directory_is_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    with pytest.raises(DiskDirInUse, match="in use by another process"):
        Harness(tmp_path)
    h.close()
    Harness(tmp_path).close()  # free again once the owner closed


def test_another_fingerprint_never_reads_these_blocks(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    a = prompt(0, 30)
    h.serve(a)
    h.close()
    other = Harness(tmp_path, fingerprint="another model")
    assert not other.nodes() and other.serve(a) == 0
    other.close()
    same = Harness(tmp_path)
    assert same.serve(a) == 30
    same.close()


def test_the_disk_bound_keeps_the_most_recently_used(tmp_path: Path) -> None:
    h = Harness(tmp_path, slots=40, capacity_tokens=100)
    prompts = [prompt(i, 30) for i in range(6)]
    for p in prompts:
        h.serve(p)
    h.evict_all()
    store = h.tier.store
    assert store.used_bytes <= store.capacity_bytes
    assert store.wait_idle(10.0)
    assert sum(p.stat().st_size for p in blocks(tmp_path)) < store.capacity_bytes + 4096
    assert h.tier.disk_tokens == 90
    assert [h.serve(p) for p in prompts[3:]] == [30, 30, 30]
    assert [h.serve(p) for p in prompts[:3]] == [0, 0, 0]
    h.close()
    smaller = Harness(tmp_path, slots=40, capacity_tokens=60)  # a lower bound at restart
    assert smaller.tier.store.used_bytes <= smaller.tier.store.capacity_bytes
    assert smaller.tier.disk_tokens == 60
    smaller.close()


def test_selective_writes_hit_shared_or_long_nodes_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("radixlm.cache.disk_tier.SELECTIVE_MIN_TOKENS", 32)
    h = Harness(tmp_path, policy="selective")
    once, hit, long = prompt(0, 10), prompt(1, 10), prompt(2, 40)
    h.serve(once)
    h.serve(hit)
    h.serve(hit)
    h.serve(long)
    h.evict_all()
    assert h.serve(once) == 0
    assert h.serve(hit) == 10
    assert h.serve(long) == 40
    h.close()


def test_off_writes_nothing_new_but_serves_what_is_on_disk(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    a, b = prompt(0, 30), prompt(1, 30)
    h.serve(a)
    h.close()
    off = Harness(tmp_path, policy="off")
    off.serve(b)
    off.evict_all()
    assert off.serve(b) == 0
    assert off.serve(a) == 30
    off.close()


def test_shutdown_writes_ancestors_of_what_the_policy_keeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(tmp_path, policy="selective")
    shared = prompt(0, 20)
    one = shared + prompt(1, 10)
    h.serve(one)
    h.serve(one)  # the whole path is hit once
    h.serve(shared + prompt(2, 10))  # a one-off sibling: not kept
    h.close()
    h2 = Harness(tmp_path, policy="selective")
    assert h2.serve(one) == 30
    assert h2.serve(shared + prompt(2, 10)) == 20
    h2.close()


def test_cache_events_count_disk_prefixes_as_cached(tmp_path: Path) -> None:
    h = Harness(tmp_path, slots=40, capacity_tokens=40)
    log = CacheEventLog(h.cache)
    a, b = prompt(0, 30), prompt(1, 30)
    h.serve(a)
    assert log.drain().snapshot is not None  # the first drain is a snapshot
    h.evict_all()  # a to disk: still cached
    assert log.drain().events == []
    assert [key for _, key in log.drain(snapshot=True).snapshot or []] == [a]
    h.serve(b)
    h.evict_all()  # b to disk pushes a out of the bound: a is no longer cached anywhere
    events = log.drain().events
    assert ("remove", a, 0) in events
    assert [key for _, key in log.drain(snapshot=True).snapshot or []] == [b]
    h.close()


def test_a_prefetched_block_is_read_ahead_and_still_checked(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    a, b = prompt(0, 30), prompt(1, 30)
    h.serve(a)
    h.serve(b)
    h.close()
    path = block_of(tmp_path, b)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x10
    path.write_bytes(bytes(raw))
    h2 = Harness(tmp_path)
    h2.tier.prefetch(a + [1, 2])
    h2.tier.prefetch(b)
    entries = [n.disk.entry for n in h2.nodes()]
    assert all(e.prefetch is not None for e in entries)
    assert h2.serve(a + [1, 2]) == 30
    assert h2.serve(b) == 0  # read ahead, failed its checksum: a miss
    assert all(e.prefetch is None for e in entries)
    h2.close()


@pytest.mark.parametrize("policy", ["selective", "write_through"])
def test_random_traffic_never_returns_wrong_kv(tmp_path: Path, policy: str) -> None:
    """Prompts branching off a few shared stems, a pool and a disk bound both far smaller than
    them, restarts, flushes and tier clears in between: every hit's K/V is checked, and the
    invariants after each request."""
    rng = torch.Generator().manual_seed(0)
    stems = [prompt(100 + i, 24) for i in range(4)]

    def draw() -> list[int]:
        i = int(torch.randint(0, len(stems), (1,), generator=rng))
        cut = int(torch.randint(1, 25, (1,), generator=rng))
        tail = int(torch.randint(0, 6, (1,), generator=rng))
        return stems[i][:cut] + prompt(int(torch.randint(0, 8, (1,), generator=rng)), tail)

    h = Harness(tmp_path, slots=48, capacity_tokens=120, policy=policy)
    hits = loaded = 0
    for step in range(150):
        hits += h.serve(draw())
        if step % 50 == 49:
            loaded += h.tier.loaded_tokens
            h.close()
            h = Harness(tmp_path, slots=48, capacity_tokens=120, policy=policy)
        elif step % 7 == 0:
            h.evict_all()
        elif step % 11 == 0:
            assert h.cache.flush()
            h.check()
        elif step % 23 == 0:
            h.cache.clear_tier()
            h.check()
        assert h.tier.store.used_bytes <= h.tier.store.capacity_bytes
    assert hits > 0 and loaded > 0
    h.close()


def test_a_salted_prefix_comes_back_only_to_its_salt(tmp_path: Path) -> None:
    """The salt is part of a block's key: after eviction and a restart, a salted path is found
    by requests with that salt only; the public part stays shared."""
    public, private = prompt(0, 10), prompt(1, 20)
    ids = public + private

    def serve(h: Harness, salt: str | None) -> int:
        h.cache.load_prefix(ids, salt=salt, public_len=10)
        m = h.cache.match_prefix(ids, salt=salt, public_len=10)
        hit = m.slots.numel()
        if hit:
            assert torch.equal(h.read_pool(m.slots), kv(ids, 0, hit))
        h.cache.lock(m.node)
        new = h.alloc.alloc(len(ids) - hit)
        assert new is not None
        h.tier.load(new, kv(ids, hit, len(ids)))
        h.cache.cache_finished(ids, torch.cat([m.slots, new]), m.node, salt=salt, public_len=10)
        h.check()
        return hit

    h = Harness(tmp_path)
    assert serve(h, "tenant-a") == 0
    h.evict_all()
    h.close()
    h2 = Harness(tmp_path)
    assert serve(h2, "tenant-b") == 10  # the public part only
    assert serve(h2, "tenant-a") == 30
    h2.close()


def test_lpm_counts_a_prefix_on_disk_as_cached(tmp_path: Path) -> None:
    """The longest-prefix-first order ranks a request whose prefix lies on disk (loaded, not
    computed) with the cached ones; matching reads the disk path without changing it."""
    h = Harness(tmp_path)
    on_disk, in_pool = prompt(0, 40), prompt(1, 20)
    h.serve(on_disk)
    h.evict_all()
    h.serve(in_pool)
    params = SamplingParams(max_new_tokens=1)

    def req(rid: str, ids: list[int]) -> Req:
        return Req.from_message(GenerateRequest(rid=rid, input_ids=ids, params=params), [])

    # Arrival order: cold, the pool hit (20 tokens), the disk hit (30 of 40 tokens, then new).
    cold = req("cold", prompt(2, 50))
    pool_hit = req("pool", in_pool + prompt(3, 10))
    disk_hit = req("disk", on_disk[:30] + prompt(4, 10))
    before = [(n.key, n.in_pool) for n in h.nodes()]
    match = h.cache.match_prefix(disk_hit.fill_ids)
    assert match.slots.numel() == 0 and match.on_disk == 30
    assert h.cache.match_prefix(on_disk + [7]).on_disk == 40
    assert h.cache.match_prefix(pool_hit.fill_ids).on_disk == 0
    ordered, _ = SchedulePolicy("lpm", h.cache).order([cold, pool_hit, disk_hit])
    assert [r.rid for r in ordered] == ["disk", "pool", "cold"]
    assert [(n.key, n.in_pool) for n in h.nodes()] == before  # nothing split or loaded
    assert h.serve(disk_hit.fill_ids) == 30
    h.close()


def test_a_flush_keeps_what_the_tier_holds(tmp_path: Path) -> None:
    """A flush empties the pool; the nodes the tier keeps stay disk-only and hit afterwards, as
    after a restart (write_through writes each one on the way out)."""
    h = Harness(tmp_path)
    a, b = prompt(0, 30), prompt(1, 20)
    h.serve(a)
    h.serve(a[:10] + b)
    assert h.cache.flush()
    h.check()
    assert h.alloc.num_free == h.alloc.num_slots and h.cache.total_size() == 0
    assert h.nodes() and all(not n.in_pool for n in h.nodes())
    assert h.serve(a[:10] + b) == 30
    assert h.serve(a) == 30
    h.close()


def test_clearing_the_tier_deletes_every_block_and_keeps_the_pool(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    a, b, c = prompt(0, 30), prompt(1, 20), prompt(2, 20)
    h.serve(a)
    h.serve(b)
    h.evict_all()  # both on disk
    assert h.serve(a) == 30  # a back in the pool, its disk copy kept
    h.serve(a + c)  # a leaf only in the pool, under a
    assert h.tier.store.wait_idle(10.0) and len(blocks(tmp_path)) == 2
    lock = h.cache.match_prefix(a).node
    h.cache.lock(lock)  # a running request's path: clearing the tier leaves it alone
    h.cache.clear_tier()
    h.check()
    assert h.tier.disk_tokens == 0 and not any(n.disk is not None for n in h.nodes())
    assert all(n.in_pool for n in h.nodes())  # b (disk-only) left the tree
    assert h.tier.store.wait_idle(10.0) and blocks(tmp_path) == []
    h.cache.unlock(lock)
    assert h.serve(a + c) == 50  # the pool's copy still serves
    assert h.serve(b) == 0
    h.close()
