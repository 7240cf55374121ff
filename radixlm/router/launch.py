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

import uvicorn

from radixlm.engine.args import EngineArgs
from radixlm.router.app import create_router_app
from radixlm.router.args import RouterArgs
from radixlm.server.args import ServerArgs
from radixlm.server.child_process import ServerProcess, serve_argv
from radixlm.server.launch import GRACEFUL_SHUTDOWN_S, bind

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 600.0


def serve_router(args: RouterArgs) -> int:
    """Run the router until Ctrl-C or SIGTERM; the exit status (1 if it could not start)."""
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        return 1
    return _run(args, sock)


def _run(args: RouterArgs, sock: socket.socket, on_close: Callable[[], None] | None = None) -> int:
    # Accepted connections inherit it: a small answer written in two parts (headers, body)
    # must not wait for the client's delayed ACK (40 ms on Linux).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    port = sock.getsockname()[1]
    args = dataclasses.replace(args, port=port)
    config = uvicorn.Config(
        create_router_app(args, on_close),
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
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
    the router in front of them on the server's address; stop them all on exit."""
    try:
        sock = bind(server_args.host, server_args.port)
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", server_args.host, server_args.port, e)
        return 1
    threads = max(1, (os.cpu_count() or 1) // dp)
    env = {"OMP_NUM_THREADS": str(threads), **os.environ}
    worker_args = dataclasses.replace(server_args, host="127.0.0.1", port=0)
    log_dir = tempfile.mkdtemp(prefix="radixlm-dp-")
    logger.info("starting %d engine servers (%s threads each; logs in %s)", dp, threads, log_dir)

    def start(i: int) -> ServerProcess:
        log = os.path.join(log_dir, f"worker-{i}.log")
        args = engine_args
        if args.kv_cache_dir:  # one process per disk tier directory, the size bound shared
            args = dataclasses.replace(
                args,
                kv_cache_dir=os.path.join(args.kv_cache_dir, f"worker-{i}"),
                kv_disk_size=args.kv_disk_size / dp,
            )
        return ServerProcess.start(serve_argv(args, worker_args), log, env, WORKER_START_TIMEOUT_S)

    workers: list[ServerProcess] = []

    def stop_workers() -> None:
        # Also from the app's shutdown: uvicorn re-raises SIGTERM once it has stopped, which
        # ends this process before any `finally` here runs.
        with ThreadPoolExecutor(max(1, len(workers))) as pool:
            for w, error in zip(workers, pool.map(_stop, workers), strict=True):
                if error:
                    logger.error("stopping %s: %s", w.url, error)

    try:
        with ThreadPoolExecutor(dp) as pool:
            futures = [pool.submit(start, i) for i in range(dp)]
            for f in futures:
                try:
                    workers.append(f.result())
                except RuntimeError as e:
                    logger.error("an engine server failed to start: %s", e)
        if len(workers) < dp:
            return 1
        args = RouterArgs(
            worker_urls=tuple(w.url for w in workers),
            host=server_args.host,
            api_key=server_args.api_key,
            log_level=server_args.log_level,
            extra={"dp": dp, **server_args.public(), **engine_args.to_dict()},
        )
        return _run(args, sock, stop_workers)
    finally:
        sock.close()
        stop_workers()


def _stop(server: ServerProcess) -> str | None:
    """Stop a server; why it had to be killed, if it had to."""
    try:
        server.stop()
    except RuntimeError as e:
        return str(e)
    return None
