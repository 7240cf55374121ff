"""radixlm: fast execution of LM programs with a RadixAttention runtime."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# OpenMP threads that spin while idle stall every small op when the cores are shared (a 2-core
# machine running a server and its clients): passive waiting is far more robust there. It must
# be set before torch loads OpenMP, hence here; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

if TYPE_CHECKING:
    from radixlm.engine.engine import Engine
    from radixlm.lang import *  # noqa: F403

__all__ = ["Engine", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use so `import radixlm` stays light (no torch until an engine is built).
    if name == "Engine":
        from radixlm.engine.engine import Engine

        return Engine
    # The frontend language's names (`radixlm.function`, `radixlm.gen`, ...), as in `sglang`.
    import radixlm.lang

    if name in radixlm.lang.__all__:
        return getattr(radixlm.lang, name)
    raise AttributeError(f"module 'radixlm' has no attribute {name!r}")
