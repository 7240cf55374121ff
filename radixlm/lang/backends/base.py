"""What the interpreter needs from a model: generate, stream, score choices, cache a prefix."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from radixlm.lang.chat import ChatTemplate
from radixlm.lang.choices import ChoiceDecision, ChoicesMethod
from radixlm.lang.ir import GenParams


@dataclass(frozen=True)
class Prompt:
    """A program state as a backend sees it: the full text, and the closed chat messages."""

    text: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # base64, one per image token in the text


class Backend:
    """A model that runs programs. Methods may be called from many threads at once."""

    # Chat-only APIs take messages, not text: gens must open an assistant message.
    is_chat_model: bool = False
    # Where a prompt puts an image (the model's image token); None: the model takes no images.
    image_token: str | None = None

    def __init__(self, chat_template: ChatTemplate | None = None) -> None:
        self.chat_template = chat_template or ChatTemplate()

    def generate(
        self, prompt: Prompt, params: GenParams
    ) -> tuple[str | list[str], dict[str, Any] | list[dict[str, Any]]]:
        """The completion of the prompt and its meta_info (lists of both when params.n > 1)."""
        raise NotImplementedError

    def generate_stream(
        self, prompt: Prompt, params: GenParams
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """The completion as (new text, meta_info so far) pieces."""
        raise NotImplementedError

    def select(self, prompt: Prompt, choices: list[str], method: ChoicesMethod) -> ChoiceDecision:
        """Score every choice as a continuation of the prompt and pick one."""
        raise NotImplementedError

    def cache_prefix(self, text: str, images: list[str] | None = None) -> None:
        """Prefill `text` (with its `images`) so later requests that start with it reuse its KV
        cache (may do nothing)."""

    def pin_prefix(self, text: str, ttl_s: float) -> dict[str, Any]:
        """Prefill and pin `text` for ttl_s seconds (eviction skips it); the pin's description."""
        raise NotImplementedError(f"{type(self).__name__} cannot pin a prefix")

    def flush_cache(self) -> bool:
        """Drop the server's prefix cache; False where that is not possible."""
        return False

    def get_server_info(self) -> dict[str, Any]:
        """What the server says about itself."""
        return {}
