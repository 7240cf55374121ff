"""The two transports of the engine client: the core on a thread, or in its own process."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, cast

from radixlm.core.messages import ControlReply, Message, TokenOutput
from radixlm.engine.client import EngineDeadError
from radixlm.engine.process import EngineProcess

logger = logging.getLogger(__name__)

OnOutputs = Callable[[list[TokenOutput | ControlReply]], None]
OnExit = Callable[[EngineDeadError], None]
# EngineCore.run: the core's message loop, until it receives None.
CoreLoop = Callable[[Callable[[bool], list[Message]], Callable[[list[Any]], None]], None]

_STOP_SENDER = object()


class ThreadTransport:
    """The core's loop on a daemon thread of this process; torch releases the GIL in its kernels,
    and outputs are routed on that thread as the core emits them."""

    def __init__(self, run: CoreLoop) -> None:
        self._run_core = run
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, on_outputs: OnOutputs, on_exit: OnExit) -> None:
        """Start the core's thread."""
        self._thread = threading.Thread(
            target=self._run, args=(on_outputs, on_exit), name="radixlm-engine", daemon=True
        )
        self._thread.start()

    def _run(self, on_outputs: OnOutputs, on_exit: OnExit) -> None:
        error = EngineDeadError("the engine was shut down")
        try:
            self._run_core(self._receive, on_outputs)
        except BaseException as e:  # surfaces in every waiter instead of hanging them
            error = EngineDeadError(f"the engine core failed: {e!r}")
            error.__cause__ = e
        on_exit(error)

    def _receive(self, block: bool) -> list[Message]:
        msgs: list[Message] = []
        try:
            msgs.append(self._inbox.get(block=block))
            while True:
                msgs.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return msgs

    def send(self, msg: Message) -> None:
        """Queue a message for the core."""
        self._inbox.put(msg)

    def close(self) -> None:
        """Ask the core's loop to stop and wait for it (at most 30 s: a step in progress ends)."""
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(None)
            self._thread.join(timeout=30)


class ProcessTransport:
    """The core in its own process (`EngineProcess`), behind two threads: a sender, so that a large
    message never blocks its caller (an event loop) while the core is in a forward pass, and a
    reader, which blocks on the core's pipe and routes each output batch as it arrives."""

    def __init__(self, engine: EngineProcess) -> None:
        self.engine = engine
        self._outbox: queue.SimpleQueue[Message | object] = queue.SimpleQueue()
        self._sender: threading.Thread | None = None
        self._closing = False

    def start(self, on_outputs: OnOutputs, on_exit: OnExit) -> None:
        """Start the sender and reader threads."""
        self._sender = threading.Thread(
            target=self._send_loop, args=(on_exit,), name="radixlm-sender", daemon=True
        )
        self._sender.start()
        threading.Thread(
            target=self._read_loop, args=(on_outputs, on_exit), name="radixlm-reader", daemon=True
        ).start()

    def send(self, msg: Message) -> None:
        """Queue a message for the sender thread."""
        self._outbox.put(msg)

    def _send_loop(self, on_exit: OnExit) -> None:
        while (msg := self._outbox.get()) is not _STOP_SENDER:
            try:
                self.engine.send(cast("Message", msg))
            except (OSError, ValueError):
                on_exit(self._death())
                return

    def _read_loop(self, on_outputs: OnOutputs, on_exit: OnExit) -> None:
        try:
            while True:
                on_outputs(self.engine.recv())
        except (EOFError, OSError):
            pass
        finally:  # whatever ended the loop, every waiter must hear of it
            death = self._death()
            if not self._closing:
                logger.error("%s", death)
            on_exit(death)

    def _death(self) -> EngineDeadError:
        """Why the core is gone, the same whichever thread notices first (a send into the
        closed pipe can come before the read of its end): the exit code once the process has
        ended (waiting a second for it)."""
        self.engine.process.join(timeout=1)
        code = self.engine.process.exitcode
        if code is None:
            return EngineDeadError("the engine process is gone")
        return EngineDeadError(f"the engine process exited (exit code {code})")

    def close(self) -> None:
        """Stop the sender, then the core process (killed if it does not stop in time)."""
        self._closing = True
        if self._sender is not None:
            self._outbox.put(_STOP_SENDER)
            self._sender.join(timeout=5)
        self.engine.shutdown()
