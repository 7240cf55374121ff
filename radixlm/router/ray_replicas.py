"""`serve --dp N --ray`: the N replicas as Ray actors, one per resource bundle of a placement
group spread over the cluster's nodes, each running a `radixlm serve` child on its node's
address. Ray restarts an actor that dies (a replica whose server dies exits, so that Ray
restarts it); the router's ReplicaSet swaps the new URL into its pool.

Only `radixlm serve --ray` imports this module: `ray` is an optional dependency.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from radixlm.engine.args import EngineArgs
from radixlm.router.args import RayArgs
from radixlm.router.replicas import WORKER_START_TIMEOUT_S, ReplicaSet
from radixlm.server.args import ServerArgs
from radixlm.server.child_process import ServerProcess, serve_argv

logger = logging.getLogger(__name__)

# Seconds an actor may take to say its URL before it counts as dead.
ALIVE_TIMEOUT_S = 10.0
# Seconds the cluster may take to reserve every replica's resources.
PLACEMENT_TIMEOUT_S = 120.0
# Calls to a restarted actor that may fail (the ones sent before it died) before it is taken
# for dead for good (Ray spent its restarts).
DEAD_CALLS = 3


class EngineServer:
    """The Ray actor of one replica: a `radixlm serve` child on the node's address, killed with
    the actor. The actor exits when its server dies, so that Ray restarts both."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        host = ray.util.get_node_ip_address()
        self._stopping = False
        self._server = ServerProcess.start(
            [*argv, "--host", host],
            env={**os.environ, **env},
            timeout=WORKER_START_TIMEOUT_S,
            die_with_parent=True,
        )
        threading.Thread(target=self._exit_with_server, daemon=True).start()

    def _exit_with_server(self) -> None:
        self._server.proc.wait()
        if not self._stopping:
            logger.error("the replica's server exited with %s", self._server.proc.returncode)
            os._exit(1)

    def url(self) -> str:
        """The server's base URL."""
        return self._server.url

    def stop(self) -> None:
        """Stop the server (the actor is killed next)."""
        self._stopping = True
        self._server.stop()


class RayReplica:
    """One replica as the router's process sees it: a handle on its actor (see Replica)."""

    def __init__(self, actor: Any, url: str) -> None:
        self._actor = actor
        self._url = url
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        """See Replica."""
        return self._url

    def alive(self) -> bool:
        """See Replica."""
        try:
            return bool(ray.get(self._actor.url.remote(), timeout=ALIVE_TIMEOUT_S) == self._url)
        except RayError:
            return False

    def restart(self) -> str:
        """See Replica: Ray restarts the actor, which starts a new server; wait for its URL."""
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        failures = 0
        while not self._stopped.is_set():
            if time.monotonic() > deadline:
                raise RuntimeError(f"not back after {WORKER_START_TIMEOUT_S:g} s")
            try:
                self._url = ray.get(self._actor.url.remote(), timeout=1.0)
                return self._url
            except GetTimeoutError:
                continue
            except RayActorError as e:
                failures += 1
                if failures >= DEAD_CALLS:
                    raise RuntimeError(f"Ray did not restart it: {e}") from e
                self._stopped.wait(1.0)
        raise RuntimeError("stopped")

    def stop(self) -> None:
        """See Replica."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        try:
            ray.get(self._actor.stop.remote(), timeout=60.0)
        except RayError as e:
            logger.info("the replica was gone already: %s", e)
        ray.kill(self._actor, no_restart=True)


def start_ray_replicas(
    engine_args: EngineArgs, server_args: ServerArgs, dp: int, ray_args: RayArgs
) -> ReplicaSet | None:
    """Start dp replicas on the cluster; None if they could not be placed or started."""
    ray.init(address=ray_args.address)
    group = placement_group([ray_args.bundle] * dp, strategy="SPREAD")
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except GetTimeoutError:
        logger.error(
            "the Ray cluster cannot place %d replicas of %s within %g s (ray.cluster_resources()"
            " = %s)",
            dp,
            ray_args.bundle,
            PLACEMENT_TIMEOUT_S,
            ray.cluster_resources(),
        )
        _close(group)
        return None
    actor_class: Any = ray.remote(EngineServer)
    worker_args = dataclasses.replace(server_args, port=0)
    argv = serve_argv(engine_args, worker_args)
    env = {"OMP_NUM_THREADS": str(max(1, int(ray_args.num_cpus)))}
    actors = [
        actor_class.options(
            num_cpus=ray_args.num_cpus,
            num_gpus=ray_args.num_gpus,
            max_restarts=server_args.max_engine_restarts,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=i
            ),
        ).remote(argv, env)
        for i in range(dp)
    ]
    try:
        urls = ray.get([a.url.remote() for a in actors], timeout=WORKER_START_TIMEOUT_S)
    except RayError as e:
        logger.error("a replica failed to start: %s", e)
        for a in actors:
            ray.kill(a, no_restart=True)
        _close(group)
        return None
    logger.info("replicas on Ray at %s", ", ".join(urls))
    replicas = [RayReplica(a, u) for a, u in zip(actors, urls, strict=True)]
    return ReplicaSet(replicas, lambda: _close(group))


def _close(group: Any) -> None:
    """Free the replicas' resources and leave the cluster (once)."""
    if ray.is_initialized():
        remove_placement_group(group)
        ray.shutdown()
