"""The native /generate protocol shared by the in-process Engine and RuntimeEndpoint backends."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from radixlm.lang.backends.base import Backend, Prompt
from radixlm.lang.choices import ChoiceDecision, ChoiceScores, ChoicesMethod, choice_tokens
from radixlm.lang.ir import GenParams


class NativeBackend(Backend):
    """Speaks SGLang's /generate requests, as SGLang's RuntimeEndpoint sends them.

    Subclasses provide the transport: `_call` sends one request body and returns the response
    (a dict, or a list for a batch); `_call_stream` yields the cumulative stream events. Every
    body carries `cache_salt` when it is set: the program's K/V is then shared with no request
    of another salt.
    """

    cache_salt: str | None = None

    def _send(self, payload: dict[str, Any]) -> Any:
        return self._call(self._salted(payload))

    def _salted(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload if self.cache_salt is None else {**payload, "cache_salt": self.cache_salt}

    def _call(self, payload: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _call_stream(self, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def generate(
        self, prompt: Prompt, params: GenParams
    ) -> tuple[str | list[str], dict[str, Any] | list[dict[str, Any]]]:
        """One /generate call with the whole prompt text."""
        out = self._send(_gen_payload(prompt, params))
        if isinstance(out, list):
            return [o["text"] for o in out], [o["meta_info"] for o in out]
        return out["text"], out["meta_info"]

    def generate_stream(
        self, prompt: Prompt, params: GenParams
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """A streamed /generate call; the server's text is cumulative, this yields the new part."""
        seen = 0
        payload = self._salted({**_gen_payload(prompt, params), "stream": True})
        for event in self._call_stream(payload):
            text = event["text"]
            yield text[seen:], event["meta_info"]
            seen = len(text)

    def select(self, prompt: Prompt, choices: list[str], method: ChoicesMethod) -> ChoiceDecision:
        """Cache the prefix, then score all choices in one batched prompt-logprob call."""
        prefix = prompt.text
        if not prefix:
            raise ValueError("select needs some text before it to condition the choices on")
        images = _images(prompt.images)
        first = self._send({"text": prefix, "sampling_params": {"max_new_tokens": 0}, **images})
        prefix_tokens = first["meta_info"]["prompt_tokens"]
        # Two tokens back, so a choice that re-tokenizes the prefix's last token is scored too.
        start = max(prefix_tokens - 2, 0)
        outs = self._send(
            {
                "text": [prefix + c for c in choices],
                "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                "return_logprob": True,
                "return_text_in_logprobs": True,
                "logprob_start_len": start,
                **({"image_data": [prompt.images] * len(choices)} if prompt.images else {}),
            }
        )
        tokens = [
            choice_tokens(o["meta_info"]["input_token_logprobs"], prefix, c, prefix_tokens, start)
            for o, c in zip(outs, choices, strict=True)
        ]
        unconditional = None
        if method.requires_unconditional_logprobs:
            outs = self._send(
                {
                    "input_ids": [[t[1] for t in toks] for toks in tokens],
                    "sampling_params": {"max_new_tokens": 0},
                    "return_logprob": True,
                    "logprob_start_len": 0,
                }
            )
            unconditional = [o["meta_info"]["input_token_logprobs"] for o in outs]
        return method(ChoiceScores(choices, tokens, unconditional))

    def cache_prefix(self, text: str, images: list[str] | None = None) -> None:
        """A prefill-only call (max_new_tokens 0): the server keeps the prompt's KV cache."""
        if text:
            self._send({"text": text, "sampling_params": {"max_new_tokens": 0}, **_images(images)})


def _images(images: list[str] | None) -> dict[str, Any]:
    """The image_data field of a prompt's request (none without images)."""
    return {"image_data": list(images)} if images else {}


def _gen_payload(prompt: Prompt, params: GenParams) -> dict[str, Any]:
    return {
        "text": prompt.text,
        "sampling_params": params.sampling_dict(),
        **params.logprob_dict(),
        **_images(prompt.images),
    }
