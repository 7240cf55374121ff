"""`Runtime`: a radixlm server started from Python for LM programs, as in SGLang's frontend."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import weakref
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from radixlm.engine.args import EngineArgs
from radixlm.lang.backends.base import Prompt
from radixlm.lang.backends.runtime_endpoint import RuntimeEndpoint
from radixlm.lang.program import sampling_defaults
from radixlm.server.args import ACCEPTED_SGLANG_ARGS, ServerArgs
from radixlm.server.child_process import ServerProcess, serve_argv

if TYPE_CHECKING:
    from radixlm.tokenizer import Tokenizer

_ENGINE_FIELDS = frozenset(f.name for f in dataclasses.fields(EngineArgs))
_SERVER_FIELDS = frozenset(f.name for f in dataclasses.fields(ServerArgs))
# A server still not healthy after this long is stuck (a dead one fails the start at once).
_START_TIMEOUT_S = 1800.0


def split_args(**kwargs: Any) -> tuple[EngineArgs, ServerArgs]:
    """SGLang's server arguments as radixlm's engine and server arguments (TypeError for a
    name radixlm does not have, ValueError for a bad value)."""
    unknown = set(kwargs) - _ENGINE_FIELDS - _SERVER_FIELDS - set(ACCEPTED_SGLANG_ARGS)
    if unknown:
        raise TypeError(f"Runtime got unknown arguments: {', '.join(sorted(unknown))}")
    engine = EngineArgs(**{k: v for k, v in kwargs.items() if k in _ENGINE_FIELDS})
    server = ServerArgs(**{k: v for k, v in kwargs.items() if k in _SERVER_FIELDS})
    return engine, server


class Runtime:
    """`radixlm serve` in a child process, on any free port unless `port` is given, and a
    `RuntimeEndpoint` to it: `set_default_backend(runtime)`, then `runtime.shutdown()` (or use
    it as a context manager; it is also shut down when collected or at exit).

    Arguments are the engine's (`EngineArgs`) and the server's (`ServerArgs`), with SGLang's
    names. The server's output goes to `log_path`, removed at shutdown.
    """

    def __init__(
        self, model_path: str | None = None, log_level: str = "error", **kwargs: Any
    ) -> None:
        kwargs.setdefault("port", 0)
        self.engine_args, self.server_args = split_args(
            model_path=model_path, log_level=log_level, **kwargs
        )
        self._server = ServerProcess.start(
            serve_argv(self.engine_args, self.server_args), timeout=_START_TIMEOUT_S
        )
        self._finalizer = weakref.finalize(self, _stop, self._server)
        self.url = self._server.url
        self.generate_url = self.url + "/generate"
        try:
            self.endpoint = RuntimeEndpoint(self.url, self.server_args.api_key)
        except BaseException:
            self.shutdown()
            raise

    @property
    def pid(self) -> int:
        """The server process's id."""
        return self._server.proc.pid

    @property
    def log_path(self) -> Path:
        """The file the server writes its output to."""
        return self._server.log_path

    def shutdown(self) -> None:
        """Stop the server and its engine (again: nothing)."""
        self._finalizer()

    def cache_prefix(self, prefix: str) -> None:
        """Prefill `prefix` so that requests starting with it reuse its KV cache."""
        self.endpoint.cache_prefix(prefix)

    def get_tokenizer(self) -> Tokenizer:
        """The served model's tokenizer (with the server's chat template)."""
        from radixlm.tokenizer import Tokenizer

        info = self.endpoint.model_info
        return Tokenizer.load(info["tokenizer_path"], info.get("chat_template"))

    def generate(
        self,
        prompt: str | list[str],
        sampling_params: dict[str, Any] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
    ) -> str:
        """One native /generate call; as in SGLang, its JSON response as a string (an error's
        too)."""
        body = {
            "text": prompt,
            "sampling_params": sampling_params or {},
            "return_logprob": return_logprob,
            "logprob_start_len": logprob_start_len,
            "top_logprobs_num": top_logprobs_num,
        }
        _, data = self.endpoint.http.request("POST", "/generate", body)
        return data.decode()

    async def async_generate(
        self, prompt: str, sampling_params: dict[str, Any] | None = None
    ) -> AsyncIterator[str]:
        """Stream a generation: its text piece by piece (the event loop is not blocked)."""
        params = sampling_defaults(**(sampling_params or {}))
        pieces = cast(
            Generator[tuple[str, dict[str, Any]], None, None],
            self.endpoint.generate_stream(Prompt(prompt), params),
        )
        end = ("", None)
        try:
            while (item := await asyncio.to_thread(next, pieces, end)) is not end:
                if item[0]:
                    yield item[0]
        finally:
            with contextlib.suppress(ValueError):  # still running on its thread (cancelled)
                pieces.close()

    add_request = async_generate  # SGLang's older name

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


def _stop(server: ServerProcess) -> None:
    """Stop a Runtime's server and remove its log (the finalizer: no reference to the Runtime)."""
    try:
        server.stop()
    finally:
        server.log_path.unlink(missing_ok=True)
