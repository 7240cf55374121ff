"""Starting the server's engine process, and how often a dead one may be started again."""

from __future__ import annotations

import collections
from collections.abc import Callable

from radixlm.core.messages import CoreInfo
from radixlm.engine.args import EngineArgs
from radixlm.engine.client import Transport
from radixlm.engine.process import EngineProcess
from radixlm.engine.transport import ProcessTransport
from radixlm.tokenizer import Tokenizer

# Backoff before the k-th restart within the window: RESTART_BACKOFF_S * 2**(k-1), capped.
RESTART_BACKOFF_S = 0.5
MAX_RESTART_BACKOFF_S = 30.0

# Starts an engine and returns its transport, what it serves, and its tokenizer (blocking).
Launch = Callable[[], tuple[Transport, CoreInfo, Tokenizer]]


def launch_process(args: EngineArgs) -> Launch:
    """Start the engine core in its own process (the server's engine)."""

    def launch() -> tuple[Transport, CoreInfo, Tokenizer]:
        engine = EngineProcess(args)
        try:
            tokenizer = Tokenizer.load(engine.info.model_path, args.chat_template)
        except BaseException:
            engine.kill()
            raise
        return ProcessTransport(engine), engine.info, tokenizer

    return launch


class RestartBudget:
    """At most `max_restarts` restarts within any `window_s` seconds, each after a backoff that
    doubles with the restarts already in the window."""

    def __init__(self, max_restarts: int, window_s: float) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque()

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before restarting, counting the restart; None once the budget is spent."""
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return None
        delay = min(RESTART_BACKOFF_S * 2 ** len(self._times), MAX_RESTART_BACKOFF_S)
        self._times.append(now)
        return delay
