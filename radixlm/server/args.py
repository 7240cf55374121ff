"""The server's own arguments: where it listens, and the bounds that keep it alive under load."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

# Requests waiting beyond the running ones before new ones are refused with 503.
MAX_QUEUED_REQUESTS = 4096
# Prompt tokens of the requests in flight before new ones are refused with 503 (about 40 MB of
# token ids across the server and its engine).
MAX_QUEUED_TOKENS = 1 << 20
# Engine restarts allowed within the window; one more death and the server stays down.
MAX_ENGINE_RESTARTS = 3
ENGINE_RESTART_WINDOW_S = 600.0
TOOL_CALL_PARSERS = ("hermes", "qwen25", "mistral", "llama3")
REASONING_PARSERS = ("qwen3", "deepseek-r1")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# SGLang server arguments accepted (as flags, and by Runtime) so that SGLang's command lines and
# programs run unchanged, with why they change nothing here.
ACCEPTED_SGLANG_ARGS = {"enable_metrics": "/metrics is always on"}


@dataclass(frozen=True)
class ServerArgs:
    """How to run the HTTP server around an engine."""

    host: str = "127.0.0.1"
    port: int = 30000  # 0: any free port
    api_key: str | None = None
    api_key_file: str | None = None  # JSON {key: {"tenant", "role"}}; replaces api_key
    pin_quota_tokens: int | None = None  # pinned tokens per tenant; None: a quarter of the pool
    max_queued_requests: int = MAX_QUEUED_REQUESTS
    max_queued_tokens: int = MAX_QUEUED_TOKENS
    max_engine_restarts: int = MAX_ENGINE_RESTARTS
    engine_restart_window_s: float = ENGINE_RESTART_WINDOW_S
    log_level: str = "info"  # of the server, its engine process and uvicorn
    tool_call_parser: str | None = None  # None: the chat template's format (else hermes)
    reasoning_parser: str | None = None  # None: the output has no reasoning part
    image_dir: str | None = None  # local image paths are read only under this folder
    allow_image_urls: bool = False  # fetch http(s) image URLs (off: the server fetches nothing)

    def __post_init__(self) -> None:
        if self.api_key and self.api_key_file:
            raise ValueError("give api_key or api_key_file, not both")
        if self.pin_quota_tokens is not None and self.pin_quota_tokens < 0:
            raise ValueError(f"pin_quota_tokens must be >= 0, got {self.pin_quota_tokens}")
        for name in ("max_queued_requests", "max_queued_tokens", "max_engine_restarts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.engine_restart_window_s <= 0:
            raise ValueError(
                f"engine_restart_window_s must be positive, got {self.engine_restart_window_s}"
            )
        if self.tool_call_parser not in (None, *TOOL_CALL_PARSERS):
            raise ValueError(
                f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}; "
                f"got {self.tool_call_parser!r}"
            )
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(
                f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}; "
                f"got {self.reasoning_parser!r}"
            )
        if self.image_dir is not None and not os.path.isdir(self.image_dir):
            raise ValueError(f"image_dir {self.image_dir!r} is not a folder")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(
                f"log_level must be one of {', '.join(LOG_LEVELS)}; got {self.log_level!r}"
            )

    def public(self) -> dict[str, Any]:
        """The arguments as server_info shows them (the API key and the key file left out)."""
        info = asdict(self)
        del info["api_key"], info["api_key_file"]
        return info
