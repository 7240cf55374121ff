"""Small helpers shared across packages: the on-disk cache location, atomic writes and
progress bars."""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm


def cache_dir() -> Path:
    """The directory for converted files: `$RADIXLM_CACHE_DIR`, else `~/.cache/radixlm`."""
    env = os.environ.get("RADIXLM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "radixlm"


def freeze_heap() -> int:
    """Move every object alive now out of the cyclic GC's reach (after a collection), so that
    a full collection no longer walks what start-up built; the number of objects frozen. For a
    process's start-up only: a frozen cycle is never collected."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


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


def progress(
    total: int, desc: str, unit: str = "it", show: bool | None = None, leave: bool = False
) -> tqdm:
    """A progress bar on stderr with its count, rate and ETA (tqdm); `show` None shows it only
    on a terminal. The caller closes it (or uses it as a context manager)."""
    from tqdm import tqdm

    disable = None if show is None else not show
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=leave, dynamic_ncols=True)
