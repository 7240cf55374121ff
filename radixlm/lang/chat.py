"""Role blocks (`system`/`user`/`assistant`) rendered with the model's own chat template."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

# Renders a conversation the way Hugging Face's apply_chat_template does.
RenderFn = Callable[[list[dict[str, Any]], bool], str]

# Placeholder content: the text a template puts around it is the role's prefix and suffix.
_SENTINEL = "\x00radixlm-message-content\x00"


def render_chatml(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """ChatML, the fallback when the model's template is unknown."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class ChatTemplate:
    """Splits a chat template into the text before and after each message.

    Rendering the conversation so far with and without one more placeholder message shows exactly
    what the template writes around that message, including anything it adds only once (a BOS,
    a default system prompt before the first message).
    """

    def __init__(self, render: RenderFn | None = None) -> None:
        self.render = render or render_chatml

    def prefix_and_suffix(self, role: str, history: list[dict[str, Any]]) -> tuple[str, str]:
        """The text that opens and closes a message of `role` after the messages of `history`."""
        before = self.render(history, False) if history else ""
        after = self.render([*history, {"role": role, "content": _SENTINEL}], False)
        cut = after.find(_SENTINEL)
        if cut < 0:
            raise ValueError(f"the chat template dropped the content of a {role!r} message")
        # A template may re-render earlier messages differently once more follow; the new
        # message's prefix then starts where the two renderings part.
        start = (
            len(before) if after.startswith(before) else len(os.path.commonprefix([before, after]))
        )
        return after[start:cut], after[cut + len(_SENTINEL) :]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatTemplate:
        """The template of a radixlm Tokenizer (ChatML if the model has none)."""
        if getattr(tokenizer, "chat_template", None) is None:
            return cls()

        def render(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
            text: str = tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt
            )
            return text

        return cls(render)

    @classmethod
    def from_model_path(
        cls, model_path: str | None, chat_template: str | None = None
    ) -> ChatTemplate:
        """The template of a model on this machine (a GGUF file or HF folder), or the Jinja
        file `chat_template` in its place; else ChatML."""
        if model_path and os.path.exists(os.path.expanduser(model_path)):
            from radixlm.tokenizer import Tokenizer

            try:
                return cls.from_tokenizer(Tokenizer.load(model_path, chat_template))
            except (OSError, ValueError):
                pass
        return cls()
