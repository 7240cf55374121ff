"""The one check of a prompt's length against the model's context and the KV pool."""

from __future__ import annotations


def prompt_error(num_tokens: int, context_len: int, num_slots: int) -> str | None:
    """Why a prompt of num_tokens can never run (the message a client sees), or None if it can.

    A prompt needs at least one token, room for one generated token in the context, and one KV
    slot per token plus one in the pool.
    """
    if num_tokens == 0:
        return "the prompt is empty"
    if num_tokens >= context_len:
        return (
            f"the prompt has {num_tokens} tokens, but the context length is {context_len} "
            f"(prompts may have at most {context_len - 1})"
        )
    if num_tokens + 1 > num_slots:
        return (
            f"the prompt has {num_tokens} tokens, but the KV cache holds only {num_slots} "
            "(--max-total-tokens)"
        )
    return None
