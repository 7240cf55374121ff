"""Small helpers shared across packages: the on-disk cache location and atomic writes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """The directory for converted files: `$RADIXLM_CACHE_DIR`, else `~/.cache/radixlm`."""
    env = os.environ.get("RADIXLM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "radixlm"


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it over `path`.

    Readers see either no file or a complete one, so concurrent processes can share a cache.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh unique name rather than mkstemp, whose 0600 mode would make a shared cache private.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
