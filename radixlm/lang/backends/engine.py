"""Programs on an in-process radixlm Engine (no HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from radixlm.lang.backends.native import NativeBackend
from radixlm.lang.chat import ChatTemplate

if TYPE_CHECKING:
    from radixlm.engine.engine import Engine


class EngineBackend(NativeBackend):
    """Sends the native /generate requests straight to `Engine.generate`."""

    def __init__(self, engine: Engine, cache_salt: str | None = None) -> None:
        super().__init__(ChatTemplate.from_tokenizer(engine.tokenizer))
        self.engine = engine
        image = engine.info.image
        self.image_token = image.token_text if image is not None else None
        self.cache_salt = cache_salt

    def _call(self, payload: dict[str, Any]) -> Any:
        return self.engine.generate(**_engine_kwargs(payload))

    def _call_stream(self, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        out = self.engine.generate(**_engine_kwargs(payload))
        assert not isinstance(out, (dict, list))
        yield from out

    def pin_prefix(self, text: str, ttl_s: float) -> dict[str, Any]:
        """Engine.pin_prefix under this backend's salt."""
        return self.engine.pin_prefix(text=text, ttl_s=ttl_s, cache_salt=self.cache_salt)

    def flush_cache(self) -> bool:
        """Drop the engine's radix cache (False while requests run)."""
        return self.engine.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        """The engine's arguments and statistics."""
        return self.engine.get_server_info()


def _engine_kwargs(payload: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(payload)
    kwargs["prompt"] = kwargs.pop("text", None)
    return kwargs
