"""Running programs: one (`run`, optionally streamed) or a batch (`run_batch`) on a backend."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from radixlm.lang.backends.base import Backend, Prompt
from radixlm.lang.interpreter import Executor
from radixlm.lang.ir import GenParams, stop_tuple
from radixlm.lang.state import ProgramState
from radixlm.utils import progress

logger = logging.getLogger(__name__)

# Shorter common prefixes are not worth a request of their own (SGLang's threshold).
MIN_CACHED_PREFIX_CHARS = 64

# The backend used when run() gets none. A process-wide default is SGLang's API
# (set_default_backend); everything below takes the backend as an argument.
_default_backend: Backend | None = None


def set_default_backend(backend: Any) -> None:
    """Use `backend` (a Backend, an Engine or an object with `.endpoint`) when run() names none;
    None clears it."""
    global _default_backend
    _default_backend = None if backend is None else as_backend(backend)


def get_default_backend() -> Backend | None:
    """The backend set by set_default_backend, if any."""
    return _default_backend


def as_backend(backend: Any) -> Backend:
    """A Backend for `backend`: itself, an in-process Engine wrapped, or SGLang's Runtime.endpoint."""
    if backend is None:
        if _default_backend is None:
            raise ValueError("no backend: pass backend=... or call set_default_backend() first")
        return _default_backend
    if isinstance(backend, Backend):
        return backend
    if hasattr(backend, "endpoint"):
        return as_backend(backend.endpoint)
    if hasattr(backend, "generate") and hasattr(backend, "tokenizer"):
        from radixlm.lang.backends.engine import EngineBackend

        return EngineBackend(backend)
    raise TypeError(f"not a backend: {type(backend).__name__}")


class SglFunction:
    """A program: a Python function whose first argument is the state `s`."""

    def __init__(
        self,
        func: Callable[..., Any],
        num_api_spec_tokens: int | None = None,
        bind_arguments: dict[str, Any] | None = None,
    ) -> None:
        params = list(inspect.signature(func).parameters.values())
        if not params or params[0].name != "s":
            raise TypeError(f'the first argument of program {func.__name__!r} must be "s"')
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = dict(bind_arguments or {})
        self.arg_names = [p.name for p in params[1:]]
        self.__name__ = getattr(func, "__name__", "program")
        self.__doc__ = func.__doc__

    def bind(self, **kwargs: Any) -> SglFunction:
        """A copy with some arguments fixed."""
        unknown = set(kwargs) - set(self.arg_names)
        if unknown:
            raise TypeError(f"{self.__name__} has no arguments {sorted(unknown)}")
        return SglFunction(self.func, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    def run(
        self, *args: Any, stream: bool = False, backend: Any = None, **kwargs: Any
    ) -> ProgramState:
        """Run the program on `args`/`kwargs`. Keywords named like sampling_defaults' parameters
        (max_new_tokens, temperature, stop, ...) are defaults for its gens. With stream=True it
        returns at once and `state.text_iter()` follows it. Raises the first error of the run."""
        defaults = sampling_defaults(
            **{k: kwargs.pop(k) for k in list(kwargs) if k in _SAMPLING_KEYS}
        )
        return run_program(
            self, as_backend(backend), args, {**self.bind_arguments, **kwargs}, defaults, stream
        )

    def run_batch(
        self,
        batch_kwargs: Sequence[dict[str, Any] | Sequence[Any]],
        *,
        backend: Any = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        **sampling: Any,
    ) -> list[ProgramState]:
        """Run the program once per argument dict (or tuple), concurrently, with `sampling` as in
        run(). The batch's common prefix is cached first. A failed program does not stop the
        others: see `state.error()`."""
        defaults = sampling_defaults(**sampling)
        batch = [self._as_kwargs(a) for a in batch_kwargs]
        if not batch:
            return []
        return run_batch(self, as_backend(backend), batch, defaults, num_threads, progress_bar)

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)

    def _as_kwargs(self, args: dict[str, Any] | Sequence[Any]) -> dict[str, Any]:
        if isinstance(args, dict):
            return {**self.bind_arguments, **args}
        if len(args) > len(self.arg_names):
            raise TypeError(
                f"{self.__name__} takes {len(self.arg_names)} arguments, got {len(args)}"
            )
        return {**self.bind_arguments, **dict(zip(self.arg_names, args, strict=False))}


def sampling_defaults(
    max_new_tokens: int = 128,
    min_new_tokens: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    min_p: float = 0.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    repetition_penalty: float | None = None,
    ignore_eos: bool = False,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
) -> GenParams:
    """The gen defaults of a run, with SGLang's values (note: temperature 1.0 samples)."""
    return GenParams(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        stop=stop_tuple(stop),
        stop_token_ids=tuple(stop_token_ids) if stop_token_ids else None,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        repetition_penalty=repetition_penalty,
        ignore_eos=ignore_eos,
        return_logprob=return_logprob,
        logprob_start_len=logprob_start_len,
        top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs,
    )


_SAMPLING_KEYS = frozenset(inspect.signature(sampling_defaults).parameters)


def run_program(
    program: SglFunction,
    backend: Backend,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    defaults: GenParams,
    stream: bool,
    raise_errors: bool = True,
) -> ProgramState:
    """Execute one program; see SglFunction.run. Without raise_errors, an error (of the backend
    or of the program's own code) stops only this program and is kept as `state.error()`."""
    executor = Executor(
        backend, defaults, stream=stream, spec_tokens=program.num_api_spec_tokens, inline=True
    )
    state = ProgramState(executor)

    def body() -> None:
        try:
            state.ret_value = program.func(state, *args, **kwargs)
        except Exception as e:
            executor.finish_program(e)
        else:
            executor.finish_program()

    if stream:
        threading.Thread(target=body, name="radixlm-program", daemon=True).start()
        return state
    body()
    if raise_errors and executor.error is not None:
        raise executor.error
    return state


def run_batch(
    program: SglFunction,
    backend: Backend,
    batch: list[dict[str, Any]],
    defaults: GenParams,
    num_threads: int | str,
    progress_bar: bool,
) -> list[ProgramState]:
    """Execute a program per argument dict on a thread pool, after caching their common prefix."""
    if len(batch) > 1:
        prefix = os.path.commonprefix(
            [trace_prefix(program, backend, kw, defaults) for kw in batch]
        )
        if len(prefix) > MIN_CACHED_PREFIX_CHARS:
            backend.cache_prefix(prefix)
    threads = max(96, (os.cpu_count() or 1) * 16) if num_threads == "auto" else int(num_threads)
    threads = max(1, min(threads, len(batch)))

    def one(kwargs: dict[str, Any]) -> ProgramState:
        state = run_program(program, backend, (), kwargs, defaults, False, raise_errors=False)
        if state.executor.error is not None:
            logger.warning("a program of the batch failed: %r", state.executor.error)
        return state

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(one, kwargs) for kwargs in batch]
        if progress_bar:
            # Shown even off a terminal: the caller asked for it.
            with progress(len(batch), program.__name__, "program", show=True, leave=True) as bar:
                for _ in as_completed(futures):
                    bar.update()
        return [f.result() for f in futures]


class _TraceStop(Exception):
    """Raised at the first expression of a traced program that needs the model."""


class _NullBackend(Backend):
    """Renders roles like `real` (if given) and stops the program at its first model call."""

    def __init__(self, real: Backend | None = None) -> None:
        super().__init__(real.chat_template if real else None)
        self.is_chat_model = real.is_chat_model if real else False

    def generate(self, prompt: Prompt, params: GenParams) -> Any:
        """Stop the trace."""
        raise _TraceStop

    def select(self, prompt: Prompt, choices: list[str], method: Any) -> Any:
        """Stop the trace."""
        raise _TraceStop

    def cache_prefix(self, text: str, images: list[str] | None = None) -> None:
        """Stop the trace."""
        raise _TraceStop


def trace_prefix(
    program: SglFunction, backend: Backend, kwargs: dict[str, Any], defaults: GenParams
) -> str:
    """The text a program builds before its first model call (running its Python code that far)."""
    executor = Executor(_NullBackend(backend), defaults, inline=True)
    # _TraceStop, or the program reading a variable that no model call has set yet.
    with contextlib.suppress(Exception):
        program.func(ProgramState(executor), **kwargs)
    return executor.text
