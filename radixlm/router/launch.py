"""Run the router: in front of given workers (`radixlm router`), or of N engines it starts itself
(`radixlm serve --dp N`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn

from radixlm.engine.args import EngineArgs
from radixlm.router.app import create_router_app
from radixlm.router.args import RayArgs, RouterArgs
from radixlm.router.replicas import LocalReplica, Replica, ReplicaSet
from radixlm.server.args import ServerArgs
from radixlm.server.child_process import serve_argv
from radixlm.server.engine_launch import RestartBudget
from radixlm.server.launch import GRACEFUL_SHUTDOWN_S, bind

logger = logging.getLogger(__name__)


def serve_router(args: RouterArgs) -> int:
    """Run the router until Ctrl-C or SIGTERM; the exit status (1 if it could not start)."""
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        return 1
    return _run(args, sock)


def _run(args: RouterArgs, sock: socket.socket, replicas: ReplicaSet | None = None) -> int:
    # Accepted connections inherit it: a small answer written in two parts (headers, body)
    # must not wait for the client's delayed ACK (40 ms on Linux).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    port = sock.getsockname()[1]
    args = dataclasses.replace(args, port=port)
    config = uvicorn.Config(
        create_router_app(args, replicas),
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # uvloop and httptools when installed (dependencies on Linux and macOS): about twice
        # the requests per second of asyncio's loop and h11 (docs/benchmarks.md).
        loop="auto",
        http="auto",
        # Nothing here reads the client's address, and the workers name themselves.
        proxy_headers=False,
        server_header=False,
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    # ServerProcess reads this line to learn the port (as for `radixlm serve`).
    print(f"radixlm router listening on http://{host}:{port}", file=sys.stderr, flush=True)
    logger.info("routing to %s with policy %s", ", ".join(args.worker_urls), args.policy)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def serve_dp(engine_args: EngineArgs, server_args: ServerArgs, dp: int) -> int:
    """Start `dp` engine servers on loopback ports, the CPU threads split between them, and
    the router in front of them on the server's address; restart a server that dies (as a
    server restarts its engine: `max_engine_restarts` within `engine_restart_window_s`); stop
    them all on exit."""
    threads = max(1, (os.cpu_count() or 1) // dp)
    env = {"OMP_NUM_THREADS": str(threads), **os.environ}
    worker_args = dataclasses.replace(server_args, host="127.0.0.1", port=0)
    log_dir = Path(tempfile.mkdtemp(prefix="radixlm-dp-"))
    logger.info("starting %d engine servers (%s threads each; logs in %s)", dp, threads, log_dir)

    def start(i: int) -> LocalReplica:
        budget = RestartBudget(server_args.max_engine_restarts, server_args.engine_restart_window_s)
        (log_dir / f"worker-{i}").mkdir()
        argv = serve_argv(worker_engine_args(engine_args, i, dp), worker_args)
        return LocalReplica(argv, log_dir / f"worker-{i}", env, budget)

    return _serve_replicas(server_args, engine_args, dp, lambda: _start_all(start, dp))


def worker_engine_args(engine_args: EngineArgs, i: int, dp: int) -> EngineArgs:
    """Replica i's engine arguments: its own disk tier directory (one process per directory)
    under --kv-cache-dir, with a dp-th of the disk size bound."""
    if not engine_args.kv_cache_dir:
        return engine_args
    return dataclasses.replace(
        engine_args,
        kv_cache_dir=os.path.join(engine_args.kv_cache_dir, f"worker-{i}"),
        kv_disk_size=engine_args.kv_disk_size / dp,
    )


def serve_ray(engine_args: EngineArgs, server_args: ServerArgs, dp: int, ray_args: RayArgs) -> int:
    """`serve_dp` with the replicas as actors on a Ray cluster, which restarts them."""
    try:
        from radixlm.router.ray_replicas import start_ray_replicas
    except ImportError as e:
        logger.error("--ray needs the ray package (pip install 'radixlm[ray]'): %s", e)
        return 1

    def start() -> ReplicaSet | None:
        return start_ray_replicas(engine_args, server_args, dp, ray_args)

    info = {"ray": dataclasses.asdict(ray_args)}
    return _serve_replicas(server_args, engine_args, dp, start, **info)


def _start_all(start: Callable[[int], Replica], n: int) -> ReplicaSet | None:
    """Start n replicas at once; None (those started stopped again) if one failed."""
    started: list[Replica] = []
    with ThreadPoolExecutor(n) as pool:
        for f in [pool.submit(start, i) for i in range(n)]:
            try:
                started.append(f.result())
            except RuntimeError as e:
                logger.error("an engine server failed to start: %s", e)
    replicas = ReplicaSet(started)
    if len(started) < n:
        replicas.stop()
        return None
    return replicas


def _serve_replicas(
    server_args: ServerArgs,
    engine_args: EngineArgs,
    dp: int,
    start: Callable[[], ReplicaSet | None],
    **info: Any,
) -> int:
    """Bind the server's address, start the replicas, run the router in front of them until
    Ctrl-C or SIGTERM, and stop them."""
    try:
        sock = bind(server_args.host, server_args.port)
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", server_args.host, server_args.port, e)
        return 1
    try:
        replicas = start()
        if replicas is None:
            return 1
        args = RouterArgs(
            worker_urls=replicas.urls,
            host=server_args.host,
            api_key=server_args.api_key,
            log_level=server_args.log_level,
            extra={"dp": dp, **info, **server_args.public(), **engine_args.to_dict()},
        )
        try:
            return _run(args, sock, replicas)
        finally:
            # Also from the app's shutdown: uvicorn re-raises SIGTERM once it has stopped,
            # which ends this process before this `finally` runs. Stopping twice is harmless.
            replicas.stop()
    finally:
        sock.close()
