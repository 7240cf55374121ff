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

# The frontend language's names (`radixlm.function`, `radixlm.gen`, ...), as in `sglang`.
_LANG_NAMES = frozenset(
    {
        "OpenAI",
        "RuntimeEndpoint",
        "assistant",
        "assistant_begin",
        "assistant_end",
        "flush_cache",
        "function",
        "gen",
        "gen_int",
        "gen_string",
        "get_server_info",
        "greedy_token_selection",
        "image",
        "select",
        "set_default_backend",
        "system",
        "system_begin",
        "system_end",
        "token_length_normalized",
        "unconditional_likelihood_normalized",
        "user",
        "user_begin",
        "user_end",
    }
)

__all__ = ["Engine", "__version__", *sorted(_LANG_NAMES)]


def __getattr__(name: str) -> Any:
    # Imported on first use so `import radixlm` stays light (no torch until an engine is built).
    if name == "Engine":
        from radixlm.engine.engine import Engine

        return Engine
    if name in _LANG_NAMES:
        import radixlm.lang

        return getattr(radixlm.lang, name)
    raise AttributeError(f"module 'radixlm' has no attribute {name!r}")
