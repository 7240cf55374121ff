"""Start the HTTP server: bind the port, start the engine in the background, serve until a signal."""

from __future__ import annotations

import dataclasses
import logging
import socket
import sys

import uvicorn

from radixlm.engine.args import EngineArgs
from radixlm.server.app import create_app
from radixlm.server.args import ServerArgs
from radixlm.server.auth import KeyTable
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


def serve(engine_args: EngineArgs, server_args: ServerArgs | None = None) -> int:
    """Run the server until Ctrl-C or SIGTERM; the exit status (1 if it could not start)."""
    args = server_args or ServerArgs()
    host = args.host
    try:
        sock = bind(host, args.port)
    except OSError as e:  # the port is taken, or the address is not ours
        logger.error("cannot listen on %s:%d: %s", host, args.port, e)
        return 1
    port = sock.getsockname()[1]
    args = dataclasses.replace(args, port=port)
    manager = TokenizerManager(engine_args, args)
    manager.freeze_heap_at_start = True
    try:
        keys = KeyTable.from_file(args.api_key_file) if args.api_key_file else None
    except ValueError as e:
        logger.error("%s", e)
        return 1
    app = create_app(manager, args.api_key, args.public(), keys=keys)
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = _Server(config, manager)

    def stop(reason: str) -> None:
        server.should_exit = True

    manager.on_start_failure = stop
    url_host = f"[{host}]" if ":" in host else host
    # Tests and scripts (ServerProcess) read this line to learn the port (with --port 0), so it
    # is written whatever the log level.
    print(f"radixlm listening on http://{url_host}:{port}", file=sys.stderr, flush=True)
    logger.info("loading model %r from %s", manager.served_model_name, manager.model_path)
    try:
        server.run(sockets=[sock])
    finally:
        manager.shutdown()  # idempotent; covers exits that skip the app's shutdown
        sock.close()
    return 1 if manager.client is None and manager.failure is not None else 0
