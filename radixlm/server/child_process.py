"""`radixlm serve` as a child process: start it on a free port, wait until it is healthy, stop it.

For tests, benchmarks and notebooks (what SGLang's `launch_server_cmd`, `wait_for_server` and
`terminate_process` do, in one object).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from radixlm.engine.args import EngineArgs
from radixlm.server.args import ServerArgs

# The log line `radixlm serve` prints once its port is bound (see radixlm.server.launch).
_LISTENING = re.compile(r"listening on (http://\S+:\d+)")


def serve_argv(engine_args: EngineArgs, server_args: ServerArgs) -> list[str]:
    """The `radixlm serve` flags (each field's name, dashed; a true bool alone) that give
    exactly these arguments."""
    argv: list[str] = []
    for args in (engine_args, server_args):
        for field in dataclasses.fields(args):
            value = getattr(args, field.name)
            flag = "--" + field.name.replace("_", "-")
            if isinstance(value, bool):
                argv += [flag] if value else []
            elif value is not None:
                argv += [flag, str(value)]
    return argv


_PR_SET_PDEATHSIG = 1
# Looked up here, not in the forked child: loading a library there could wait forever on a lock
# that another of the parent's threads held at the fork.
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)


def kill_when_parent_exits() -> None:
    """In a forked child (a Popen's preexec_fn, Linux): ask the kernel for SIGKILL when the
    thread that started it ends, even by SIGKILL or an abort that skips every cleanup."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class ServerProcess:
    """A running `radixlm serve` child, its log file and its base URL."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    @classmethod
    def start(
        cls,
        args: Sequence[str] = (),
        log_path: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 300.0,
        command: str = "serve",
        die_with_parent: bool = False,
    ) -> ServerProcess:
        """Run `radixlm serve --port 0 *args` (or another command: `router`; its output into
        log_path, else a temp file), read the address it bound from the log and wait until
        /health answers 200. With die_with_parent (Linux), the child is killed when the thread
        that started it ends, even by SIGKILL (a Ray actor's server goes with its actor).

        RuntimeError, with the log, if the server exits or is not healthy within timeout.
        """
        cmd = [sys.executable, "-m", "radixlm", command, "--port", "0", *args]
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="radixlm-serve-", suffix=".log")
            os.close(fd)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=kill_when_parent_exits if die_with_parent else None,
            )
        server = cls(proc, Path(log_path))
        try:
            server._wait_healthy(time.monotonic() + timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_healthy(self, deadline: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"radixlm serve exited with {self.proc.returncode}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"radixlm serve did not become healthy:\n{self.log()}")
            if not self.url and (m := _LISTENING.search(self.log())):
                self.url = m.group(1)
            if self.url:
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                        if resp.status == 200:
                            return
                except OSError:  # refused, or 503 while the engine loads
                    pass
            time.sleep(0.2)

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for it to exit; its return code. A server that ignores
        the signal for timeout seconds is killed, and RuntimeError says so."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"radixlm serve ignored signal {sig}:\n{self.log()}") from None
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
