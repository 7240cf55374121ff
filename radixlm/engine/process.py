"""The engine core in its own process, so the forward pass never stalls an event loop."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import signal
from multiprocessing.connection import Connection
from typing import Any

from radixlm.core.messages import CoreInfo, Message
from radixlm.engine.args import EngineArgs
from radixlm.utils import freeze_heap

logger = logging.getLogger(__name__)


def _engine_main(
    args: EngineArgs, inbox: Connection, outbox: Connection, log_level: int = logging.INFO
) -> None:
    # The parent owns Ctrl-C: it asks this process to stop and then waits for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from radixlm.engine.core import EngineCore  # torch is loaded in this process only

    try:
        core = EngineCore(args)
    except BaseException as e:
        outbox.send(("error", f"{type(e).__name__}: {e}"))
        return
    # What start-up built (torch, the model, the tokenizer: ~300,000 objects) lives as long as
    # the process: out of the cyclic GC's reach, a full collection no longer walks it (it took
    # ~130 ms, a stall of every running request, on the default model). What serving creates
    # is collected as before.
    frozen = freeze_heap()
    outbox.send(("ready", dataclasses.replace(core.info(), gc_frozen_objects=frozen)))

    def receive(block: bool) -> list[Message]:
        msgs: list[Message] = []
        try:
            if block or inbox.poll():
                msgs.append(inbox.recv())
            while inbox.poll():
                msgs.append(inbox.recv())
        except EOFError:  # the parent is gone
            msgs.append(None)
        return msgs

    def emit(items: list[Any]) -> None:
        try:
            outbox.send(items)
        except (BrokenPipeError, EOFError, OSError):
            os._exit(0)

    core.run(receive, emit)


class EngineProcess:
    """Parent-side handle: start the core process, send messages, receive output batches.
    The process logs at the level of this process's root logger."""

    def __init__(self, args: EngineArgs, start_timeout_s: float = 600.0) -> None:
        ctx = mp.get_context("spawn")
        self._to_child, child_in = ctx.Pipe(duplex=False)[::-1]
        child_out, self._from_child = ctx.Pipe(duplex=False)[::-1]
        # Pipe(duplex=False) returns (reader, writer); reversed above to (writer, reader).
        self.process = ctx.Process(
            target=_engine_main,
            args=(args, child_in, child_out, logging.getLogger().getEffectiveLevel()),
            name="radixlm-engine",
            daemon=True,
        )
        self.process.start()
        child_in.close()
        child_out.close()
        if not self._from_child.poll(start_timeout_s):
            self.kill()
            raise RuntimeError(f"the engine did not start within {start_timeout_s:.0f}s")
        try:
            kind, payload = self._from_child.recv()
        except EOFError:
            raise RuntimeError("the engine process died while starting") from None
        if kind == "error":
            self.process.join(timeout=5)
            raise RuntimeError(f"the engine failed to start: {payload}")
        self.info: CoreInfo = payload

    def send(self, msg: Message) -> None:
        """Send one message to the core (raises OSError/BrokenPipeError if it is gone)."""
        self._to_child.send(msg)

    def recv(self) -> list[Any]:
        """Block for the next batch of outputs; EOFError when the process is gone."""
        return self._from_child.recv()

    @property
    def alive(self) -> bool:
        """Whether the core process is still running."""
        return self.process.is_alive()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Ask the core to stop, then make sure it has."""
        with contextlib.suppress(OSError):
            self._to_child.send(None)
        self.process.join(timeout=timeout_s)
        self.kill()

    def kill(self) -> None:
        """Stop the process at once."""
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
