"""The router's workers: health checks, and each worker's cache mirrored from its event stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import httpx
import orjson

from radixlm.core.messages import CacheEventBatch
from radixlm.router.policy import WorkerState

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
# Seconds between two attempts to follow a worker's /cache_events.
RESYNC_DELAY_S = 0.5


@dataclass(eq=False)
class Worker:
    """One worker: its routing state, whether it serves, and the task mirroring its cache."""

    state: WorkerState
    healthy: bool = False
    synced: bool = False  # its mirror follows the worker's event stream
    failure: str | None = None  # why it is not healthy
    _sync: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The worker's base URL."""
        return self.state.url

    def to_dict(self) -> dict[str, object]:
        """The worker as /workers and /get_server_info show it."""
        s = self.state
        return {
            "url": s.url,
            "healthy": self.healthy,
            "synced": self.synced,
            "failure": self.failure,
            "in_flight": s.in_flight,
            "prefill_tokens": s.prefill_tokens,
            "decoding": s.decoding,
            "cached_tokens": s.tree.num_tokens,
        }


class WorkerPool:
    """The workers known to the router. A worker that fails a health check (or a request) stops
    getting requests and keeps being probed; once healthy again it gets them again, its mirror
    resynced from a snapshot."""

    def __init__(self, client: httpx.AsyncClient, health_interval_s: float) -> None:
        self.client = client
        self.health_interval_s = health_interval_s
        self.workers: dict[str, Worker] = {}
        self._health: asyncio.Task[None] | None = None

    def start(self, urls: tuple[str, ...]) -> None:
        """Add the first workers and start the health checks (on the event loop)."""
        for url in urls:
            self.add(url)
        self._health = asyncio.create_task(self._check_forever())

    async def close(self) -> None:
        """Stop every background task."""
        tasks = [w._sync for w in self.workers.values() if w._sync] + [self._health]
        for task in tasks:
            if task is not None:
                task.cancel()
        for task in tasks:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def healthy(self) -> list[WorkerState]:
        """The workers that get requests now."""
        return [w.state for w in self.workers.values() if w.healthy]

    def add(self, url: str) -> Worker:
        """Know a worker (healthy after its first good health check); the known one if any."""
        url = url.rstrip("/")
        if url in self.workers:
            return self.workers[url]
        worker = Worker(WorkerState(url), failure="not checked yet")
        self.workers[url] = worker
        worker._sync = asyncio.create_task(self._follow_cache(worker))
        return worker

    def remove(self, url: str) -> bool:
        """Forget a worker; False if unknown."""
        worker = self.workers.pop(url.rstrip("/"), None)
        if worker is None:
            return False
        worker.healthy = False
        if worker._sync is not None:
            worker._sync.cancel()
        return True

    def mark_failed(self, state: WorkerState, reason: str) -> None:
        """A request to the worker failed at the connection: no more requests until a health
        check passes again."""
        worker = self.workers.get(state.url)
        if worker is not None and worker.healthy:
            logger.warning("worker %s failed: %s; taken out of routing", state.url, reason)
            worker.healthy = False
            worker.failure = reason

    async def check(self, worker: Worker) -> bool:
        """One health check; updates and returns whether the worker is healthy."""
        try:
            resp = await self.client.get(worker.url + "/health", timeout=HEALTH_TIMEOUT_S)
            failure = None if resp.status_code == 200 else f"/health answered {resp.status_code}"
        except httpx.HTTPError as e:
            failure = f"/health failed: {type(e).__name__}: {e}"
        if failure is None and not worker.healthy:
            logger.info("worker %s is healthy", worker.url)
        elif failure is not None and worker.healthy:
            logger.warning("worker %s is unhealthy: %s", worker.url, failure)
        worker.healthy, worker.failure = failure is None, failure
        return worker.healthy

    async def _check_forever(self) -> None:
        while True:
            workers = list(self.workers.values())
            await asyncio.gather(*(self.check(w) for w in workers))
            await asyncio.sleep(self.health_interval_s)

    async def _follow_cache(self, worker: Worker) -> None:
        """Mirror the worker's cache from its /cache_events stream, reconnecting (and so
        resyncing from a snapshot) whenever it breaks."""
        tree = worker.state.tree
        while True:
            try:
                async with self.client.stream("GET", worker.url + "/cache_events") as resp:
                    if resp.status_code == 200:
                        async for line in resp.aiter_lines():
                            if line:
                                data = orjson.loads(line)
                                batch = CacheEventBatch(data["snapshot"], data["events"])
                                tree.apply_batch(batch)
                                worker.synced = worker.synced or batch.snapshot is not None
            except httpx.HTTPError:
                pass
            except Exception:
                logger.exception("cannot mirror the cache of %s", worker.url)
            worker.synced = False
            tree.clear()
            await asyncio.sleep(RESYNC_DELAY_S)
