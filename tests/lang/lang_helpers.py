"""Helpers of the language tests: a scripted fake backend (no model), a server handle."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from radixlm.lang.backends.base import Backend, Prompt
from radixlm.lang.choices import ChoiceDecision, ChoiceScores, ChoicesMethod
from radixlm.lang.ir import GenParams


@dataclass
class FakeBackend(Backend):
    """Answers from a script and records every call; `delay` makes each generate take that long."""

    reply: Callable[[Prompt, GenParams], str] = lambda prompt, params: "<gen>"
    delay: float = 0.0
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def _record(self, kind: str, value: Any) -> None:
        with self._lock:
            self.calls.append((kind, value))

    def generate(self, prompt: Prompt, params: GenParams) -> tuple[str, dict[str, Any]]:
        self._record("generate", (prompt, params))
        time.sleep(self.delay)
        return self.reply(prompt, params), {"finish_reason": {"type": "length"}}

    def generate_stream(
        self, prompt: Prompt, params: GenParams
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        self._record("generate_stream", (prompt, params))
        for piece in re.findall(r"\S+\s*", self.reply(prompt, params)):
            time.sleep(self.delay)
            yield piece, {}

    def select(self, prompt: Prompt, choices: list[str], method: ChoicesMethod) -> ChoiceDecision:
        self._record("select", (prompt, choices))
        # Longer choices score higher, so the test can predict the pick.
        tokens = [[[-1.0 / len(c), i, c]] for i, c in enumerate(choices)]
        return method(ChoiceScores(choices, tokens))

    def cache_prefix(self, text: str) -> None:
        self._record("cache_prefix", text)

    def kinds(self) -> list[str]:
        """The kinds of the calls so far, in order."""
        return [k for k, _ in self.calls]


@dataclass
class Server:
    """A `radixlm serve` child process on the embedded SmolLM2."""

    proc: subprocess.Popen[bytes]
    url: str
    model: str
