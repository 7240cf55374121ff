"""Start the HTTP server: bind the port, start the engine in the background, serve until a signal."""

from __future__ import annotations

import logging
import socket

import uvicorn

from radixlm.engine.args import MAX_QUEUED_REQUESTS, EngineArgs
from radixlm.server.app import create_app
from radixlm.server.tokenizer_manager import TokenizerManager

logger = logging.getLogger(__name__)

# Seconds that responses still being written at Ctrl-C / SIGTERM get before they are cut.
GRACEFUL_SHUTDOWN_S = 5


class _Server(uvicorn.Server):
    """uvicorn's server, which on shutdown first ends running generations with an error event,
    so that their streams close at once instead of being cut after the graceful timeout."""

    def __init__(self, config: uvicorn.Config, manager: TokenizerManager) -> None:
        super().__init__(config)
        self.manager = manager

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Fail running requests, then uvicorn's own shutdown (drain, lifespan)."""
        self.manager.stop_serving("the server is shutting down")
        await super().shutdown(sockets)


def bind(host: str, port: int) -> socket.socket:
    """Listen on host:port (port 0 picks a free one); fails before any model is loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    # Its proto is 0, so asyncio leaves Nagle on for the connections it accepts; then each
    # answer on a kept-alive connection waits ~40 ms for the client's delayed ACK. Accepted
    # sockets inherit this option.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def serve(
    engine_args: EngineArgs,
    host: str = "127.0.0.1",
    port: int = 30000,
    api_key: str | None = None,
    max_queued_requests: int = MAX_QUEUED_REQUESTS,
) -> int:
    """Run the server until Ctrl-C or SIGTERM; the exit status (1 if it could not start)."""
    try:
        sock = bind(host, port)
    except OSError as e:  # the port is taken, or the address is not ours
        logger.error("cannot listen on %s:%d: %s", host, port, e)
        return 1
    port = sock.getsockname()[1]
    manager = TokenizerManager(engine_args, max_queued_requests)
    app = create_app(manager, api_key, {"host": host, "port": port})
    config = uvicorn.Config(
        app, log_level="info", access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
    )
    server = _Server(config, manager)

    def stop(reason: str) -> None:
        server.should_exit = True

    manager.on_start_failure = stop
    url_host = f"[{host}]" if ":" in host else host
    # Tests and scripts read this line to learn the port (with --port 0).
    logger.info(
        "radixlm listening on http://%s:%d, loading model %r from %s",
        url_host, port, manager.served_model_name, manager.model_path,
    )  # fmt: skip
    try:
        server.run(sockets=[sock])
    finally:
        manager.shutdown()  # idempotent; covers exits that skip the app's shutdown
        sock.close()
    return 1 if manager.client is None and manager.failure is not None else 0
