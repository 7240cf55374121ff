"""radixlm: fast execution of LM programs with a RadixAttention runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from radixlm.engine.engine import Engine

__all__ = ["Engine", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use so `import radixlm` stays light (no torch until an engine is built).
    if name == "Engine":
        from radixlm.engine.engine import Engine

        return Engine
    raise AttributeError(f"module 'radixlm' has no attribute {name!r}")
