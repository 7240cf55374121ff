"""The engine servers the router's own process runs (`serve --dp N`, with or without Ray): each
one watched, restarted when it dies, and its new URL put in the router's pool in place of the old.

The router keeps serving from the other replicas meanwhile: a dead replica fails its health
check or its next request (which is retried elsewhere, see proxy.py) and is taken out of
routing before the watch here notices.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from radixlm.router.workers import WorkerPool
from radixlm.server.child_process import ServerProcess
from radixlm.server.engine_launch import RestartBudget

logger = logging.getLogger(__name__)

# Seconds between two checks that a replica lives.
WATCH_INTERVAL_S = 0.5
WORKER_START_TIMEOUT_S = 600.0


class Replica(Protocol):
    """One engine server: its URL, whether it lives, and how to get a new one. Every method
    blocks (the watch calls them on a thread)."""

    @property
    def url(self) -> str:
        """The base URL of the server serving now."""

    def alive(self) -> bool:
        """Whether the server serving at `url` still runs."""

    def restart(self) -> str:
        """Wait until a new server replaces the dead one; its URL. RuntimeError if none will."""

    def stop(self) -> None:
        """Stop the server for good (also while `restart` waits); RuntimeError if it had to be
        killed."""


class LocalReplica:
    """A `radixlm serve` child of this process, restarted after a backoff that doubles, at most
    `budget.max_restarts` times within its window (like a server's engine)."""

    def __init__(
        self, argv: Sequence[str], log_dir: Path, env: Mapping[str, str], budget: RestartBudget
    ) -> None:
        self._argv = list(argv)
        self._log_dir = log_dir
        self._env = dict(env)
        self._budget = budget
        self._starts = 0
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # guards _server against a stop during a restart
        self._server = self._start()

    def _start(self) -> ServerProcess:
        self._starts += 1
        log = self._log_dir / f"start-{self._starts}.log"
        return ServerProcess.start(self._argv, log, self._env, WORKER_START_TIMEOUT_S)

    @property
    def url(self) -> str:
        """See Replica."""
        return self._server.url

    def alive(self) -> bool:
        """See Replica."""
        return self._server.proc.poll() is None

    def restart(self) -> str:
        """See Replica."""
        while True:
            delay = self._budget.next_delay(time.monotonic())
            if delay is None:
                raise RuntimeError(
                    f"restarted {self._budget.max_restarts} times within "
                    f"{self._budget.window_s:g} s; not restarted again"
                )
            if self._stopped.wait(delay):
                raise RuntimeError("stopped")
            try:
                server = self._start()
            except RuntimeError as e:  # counts as a death
                logger.error("a replica failed to start: %s", e)
                continue
            with self._lock:
                if self._stopped.is_set():
                    server.stop()
                    raise RuntimeError("stopped")
                self._server = server
            return server.url

    def stop(self) -> None:
        """See Replica."""
        with self._lock:
            self._stopped.set()
            self._server.stop()


class ReplicaSet:
    """The replicas behind the router, kept alive while the router runs."""

    def __init__(
        self, replicas: Sequence[Replica], close: Callable[[], None] | None = None
    ) -> None:
        self.replicas = list(replicas)
        self._close = close

    @property
    def urls(self) -> tuple[str, ...]:
        """The replicas' URLs now."""
        return tuple(r.url for r in self.replicas)

    async def watch(self, pool: WorkerPool) -> None:
        """Restart each replica that dies and swap its URL in the pool, until cancelled."""
        await asyncio.gather(*(self._watch(pool, r) for r in self.replicas))

    async def _watch(self, pool: WorkerPool, replica: Replica) -> None:
        url = replica.url
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if await asyncio.to_thread(replica.alive):
                continue
            logger.warning("replica %s died; restarting it", url)
            pool.remove(url)
            try:
                url = await asyncio.to_thread(replica.restart)
            except RuntimeError as e:
                logger.error("replica %s stays down: %s", url, e)
                return
            logger.info("replica restarted at %s", url)
            await pool.check(pool.add(url))

    def stop(self) -> None:
        """Stop every replica (blocking), then what runs them (`close`)."""
        with ThreadPoolExecutor(max(1, len(self.replicas))) as threads:
            for r, error in zip(self.replicas, threads.map(_stop, self.replicas), strict=True):
                if error:
                    logger.error("stopping %s: %s", r.url, error)
        if self._close is not None:
            self._close()


def _stop(replica: Replica) -> str | None:
    """Stop a replica; why it had to be killed, if it had to."""
    try:
        replica.stop()
    except RuntimeError as e:
        return str(e)
    return None
