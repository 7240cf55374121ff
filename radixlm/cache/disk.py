"""The disk tier's store: one checksummed file per block of K/V, written by a background thread.

A directory holds one subdirectory per fingerprint (everything that changes K/V bytes), so a
different model or setting never reads another's blocks, and a lock file: one process at a
time. Each block file describes itself (the token ids before it and its own, the salt, dtype,
shape, checksums), so the directory is the index a restarted engine rebuilds its tree from.

File layout: MAGIC | u32 header length | u32 crc32 of the header | header (JSON) | payload.
A block is written to a temporary name and renamed when complete; leftovers of a process
killed mid-write are deleted at the next start, and a block whose size or checksum is wrong
(truncated, corrupted) reads as missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

logger = logging.getLogger(__name__)

MAGIC = b"RLMKV\x00\x01\x00"
_PREFIX = struct.Struct("<II")  # header length, header crc32
_SUFFIX = ".kv"


class DiskDirInUse(RuntimeError):
    """Another process owns the KV cache directory."""


@dataclass(eq=False)
class BlockEntry:
    """One block file: the K/V of `tokens` after `prefix`, shaped [layers, 2, kv_heads, n, head_dim]."""

    id: int
    prefix: list[int]
    tokens: list[int]
    salt: str | None
    nbytes: int  # payload bytes (what counts against the size bound)
    mtime: float = 0.0  # last access (LRU across restarts)
    refs: int = 1  # tree nodes holding a range of it (a split node holds two)
    # The K/V until the writer has put it on disk (reads are served from it meanwhile).
    host: torch.Tensor | None = field(default=None, repr=False)
    written: bool = False
    deleted: bool = False
    prefetch: Future[torch.Tensor | None] | None = field(default=None, repr=False)


class DiskStore:
    """Block files under root/<fingerprint>, at most capacity_bytes of payload."""

    def __init__(
        self,
        root: str | Path,
        fingerprint: str,
        capacity_bytes: int,
        shape: tuple[int, int, int, int],  # layers, 2, kv_heads, head_dim (per token: n is added)
        dtype: torch.dtype,
        max_pending_bytes: int = 1 << 30,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock_dir(self.root)
        self.dir = self.root / fingerprint[:32]
        self.dir.mkdir(exist_ok=True)
        self.fingerprint = fingerprint
        self.capacity_bytes = capacity_bytes
        self.max_pending_bytes = max_pending_bytes
        self.shape = shape
        self.dtype = dtype
        self.used_bytes = 0  # payload of live blocks, pending writes included
        self.num_written = 0
        self._pending_bytes = 0
        self._next_id = 0
        self._mutex = threading.Lock()
        self._queue: queue.SimpleQueue[BlockEntry | None] = queue.SimpleQueue()
        self._idle = threading.Condition(self._mutex)
        self._in_flight = 0
        self._prefetched_bytes = 0  # read ahead for queued requests, not yet taken
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="radixlm-kv-read")
        self.found = self._scan()
        self._writer = threading.Thread(
            target=self._write_loop, name="radixlm-kv-disk", daemon=True
        )
        self._writer.start()

    # ---- the engine thread's side ----------------------------------------------------------

    def put(
        self, prefix: list[int], tokens: list[int], salt: str | None, data: torch.Tensor
    ) -> BlockEntry | None:
        """Queue a block for writing (data must be the caller's own CPU copy); None, with
        nothing queued, if it does not fit the bound (the caller makes room first) or the
        writer is too far behind."""
        nbytes = data.numel() * data.element_size()
        with self._mutex:
            if (
                self.used_bytes + nbytes > self.capacity_bytes
                or self._pending_bytes + nbytes > self.max_pending_bytes
            ):
                return None
            entry = BlockEntry(self._next_id, prefix, tokens, salt, nbytes, time.time(), host=data)
            self._next_id += 1
            self._pending_bytes += nbytes
            self._in_flight += 1
            self.used_bytes += nbytes
        self._queue.put(entry)
        return entry

    def read(self, entry: BlockEntry) -> torch.Tensor | None:
        """The block's K/V, or None if its file is missing, truncated or corrupted."""
        host = entry.host
        if host is not None:
            return host
        future = self._take_prefetch(entry)
        return future.result() if future is not None else self._read_file(entry)

    def prefetch(self, entry: BlockEntry) -> None:
        """Start reading a written block on the reader thread (a queued request will need it),
        unless read-ahead already holds max_pending_bytes."""
        with self._mutex:
            if (
                not entry.written
                or entry.deleted
                or entry.prefetch is not None
                or self._prefetched_bytes + entry.nbytes > self.max_pending_bytes
            ):
                return
            self._prefetched_bytes += entry.nbytes
            entry.prefetch = self._reader.submit(self._read_file, entry)

    def _take_prefetch(self, entry: BlockEntry) -> Future[torch.Tensor | None] | None:
        with self._mutex:
            future, entry.prefetch = entry.prefetch, None
            if future is not None:
                self._prefetched_bytes -= entry.nbytes
        return future

    def _read_file(self, entry: BlockEntry) -> torch.Tensor | None:
        path = self._path(entry.id)
        payload = bytearray(entry.nbytes)
        try:
            with open(path, "rb") as f:
                header = _read_header(f)
                complete = f.readinto(payload) == entry.nbytes and not f.read(1)
        except (OSError, ValueError) as e:
            logger.warning("KV block %s unreadable (%s): treated as a miss", path.name, e)
            return None
        if not complete or zlib.crc32(payload) != header["crc32"]:
            logger.warning("KV block %s fails its checksum: treated as a miss", path.name)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        entry.mtime = time.time()
        shape = (*self.shape[:3], len(entry.tokens), self.shape[3])
        return torch.frombuffer(payload, dtype=torch.uint8).view(self.dtype).view(shape)

    def retain(self, entry: BlockEntry) -> None:
        """One more tree node holds a range of this block."""
        entry.refs += 1

    def release(self, entry: BlockEntry) -> None:
        """A node let go of its range; the block is deleted when none holds one."""
        entry.refs -= 1
        if entry.refs > 0:
            return
        self._take_prefetch(entry)
        with self._mutex:
            entry.deleted = True
            self.used_bytes -= entry.nbytes
            if not entry.written:
                return  # the writer drops it
        with contextlib.suppress(OSError):
            self._path(entry.id).unlink()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every queued block is written; False if timeout_s passed first."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout_s: float) -> None:
        """Finish queued writes (at most timeout_s), stop the writer and release the directory."""
        if not self.wait_idle(timeout_s):
            logger.warning("KV disk tier: %d blocks still unwritten at shutdown", self._in_flight)
        self._queue.put(None)
        self._writer.join(timeout=max(timeout_s, 1.0))
        self._reader.shutdown(wait=False, cancel_futures=True)
        self._lock_file.close()

    # ---- the writer thread ------------------------------------------------------------------

    def _write_loop(self) -> None:
        while (entry := self._queue.get()) is not None:
            written = False
            if not entry.deleted:
                try:
                    self._write(entry)
                    written = True
                except OSError:
                    logger.exception("KV disk tier: cannot write block %d", entry.id)
            with self._mutex:
                self._pending_bytes -= entry.nbytes
                self._in_flight -= 1
                entry.written = written
                entry.host = None  # a block that failed to write now reads as a miss
                if written:
                    self.num_written += 1
                    if entry.deleted:  # released while it was being written
                        with contextlib.suppress(OSError):
                            self._path(entry.id).unlink()
                self._idle.notify_all()

    def _write(self, entry: BlockEntry) -> None:
        data = entry.host
        assert data is not None
        payload = data.contiguous().view(torch.uint8).numpy().data
        header = {
            "fingerprint": self.fingerprint,
            "prefix": entry.prefix,
            "tokens": entry.tokens,
            "salt": entry.salt,
            "dtype": str(self.dtype).removeprefix("torch."),
            "nbytes": entry.nbytes,
            "crc32": zlib.crc32(payload),
        }
        raw = json.dumps(header, separators=(",", ":")).encode()
        final = self._path(entry.id)
        tmp = final.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + _PREFIX.pack(len(raw), zlib.crc32(raw)) + raw)
            f.write(payload)
        os.replace(tmp, final)

    # ---- start -------------------------------------------------------------------------------

    def _scan(self) -> list[BlockEntry]:
        """The blocks a previous process left, oldest access first; unreadable files and
        half-written ones are deleted."""
        found: list[BlockEntry] = []
        for path in self.dir.iterdir():
            if path.suffix != _SUFFIX:
                path.unlink(missing_ok=True)  # a write cut short (kill -9)
                continue
            try:
                block_id = int(path.stem)
                with open(path, "rb") as f:
                    header = _read_header(f)
                if header["fingerprint"] != self.fingerprint:
                    raise ValueError("another fingerprint")
                entry = BlockEntry(
                    block_id,
                    [int(t) for t in header["prefix"]],
                    [int(t) for t in header["tokens"]],
                    header["salt"],
                    int(header["nbytes"]),
                    path.stat().st_mtime,
                    written=True,
                )
                if path.stat().st_size < entry.nbytes or not entry.tokens:
                    raise ValueError("truncated")
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("KV block %s dropped at start: %s", path.name, e)
                path.unlink(missing_ok=True)
                continue
            found.append(entry)
            self.used_bytes += entry.nbytes
            self._next_id = max(self._next_id, block_id + 1)
        found.sort(key=lambda e: e.mtime)
        return found

    def _path(self, block_id: int) -> Path:
        return self.dir / f"{block_id}{_SUFFIX}"


def _read_header(f: IO[bytes]) -> dict[str, Any]:
    """A block file's header, checked against its checksum (ValueError if wrong)."""
    start = f.read(len(MAGIC) + _PREFIX.size)
    if len(start) != len(MAGIC) + _PREFIX.size or not start.startswith(MAGIC):
        raise ValueError("not a KV block file")
    length, crc = _PREFIX.unpack(start[len(MAGIC) :])
    raw = f.read(length)
    if len(raw) != length or zlib.crc32(raw) != crc:
        raise ValueError("header checksum mismatch")
    header: dict[str, Any] = json.loads(raw)
    return header


def _lock_dir(root: Path) -> IO[str]:
    """Take root's lock file for this process (released when the process ends, even by kill -9)."""
    f = open(root / "lock", "a+")  # noqa: SIM115 - held open for the store's lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "unknown"
        f.close()
        raise DiskDirInUse(
            f"KV cache directory {root} is in use by another process (pid {owner}); "
            "give each server its own --kv-cache-dir"
        ) from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f
