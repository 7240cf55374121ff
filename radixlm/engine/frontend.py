"""The tokenizer side of a request: normalise inputs, detokenize outputs, shape SGLang's dicts."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from radixlm.core.finish import FinishReason
from radixlm.core.limits import prompt_error
from radixlm.core.messages import CoreInfo, GenerateRequest, LogprobEntry, TokenOutput
from radixlm.core.params import SamplingParams
from radixlm.grammar import GrammarSpec, validate_spec
from radixlm.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from radixlm.core.images import ImageSpan
    from radixlm.multimodal.inputs import ImageSources


@dataclass(frozen=True, slots=True)
class GenerateInput:
    """One `generate` call's arguments in SGLang's shape, before tokenization."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None
    # Images (paths, data URLs, base64, http(s) URLs): one or a list per prompt, as in SGLang.
    image_data: Any = None
    cache_salt: str | None = None  # requests with different salts share no cached K/V

    @property
    def is_batch(self) -> bool:
        """Whether a list was given (the answer is then a list too)."""
        if self.text is not None:
            return isinstance(self.text, list)
        ids = self.input_ids
        return ids is not None and len(ids) > 0 and isinstance(ids[0], list)

    @property
    def num_requests(self) -> int:
        """How many engine requests this call becomes (prompts times `n`), read before any
        validation: a malformed input counts as what it claims to be."""
        if self.text is not None:
            prompts = len(self.text) if isinstance(self.text, list) else 1
        else:
            prompts = len(self.input_ids or []) if self.is_batch else 1
        params = self.sampling_params
        each = params if isinstance(params, Sequence) else [params or {}] * max(prompts, 1)

        def n_of(p: Any) -> int:
            n = p.get("n", 1) if isinstance(p, Mapping) else 1
            if isinstance(n, float) and n.is_integer():
                n = int(n)  # SamplingParams takes 2.0 for 2 (and JSON parsers give 1e30 for 10**30)
            return n if isinstance(n, int) and n > 0 else 1

        return sum(n_of(p) for p in each[: max(prompts, 1)])


def prefix_ids(tokenizer: Tokenizer, text: object, input_ids: object, vocab_size: int) -> list[int]:
    """The token ids of a prefix given as text or ids (exactly one), tokenized as a prompt is;
    ValueError for anything else."""
    if (text is None) == (input_ids is None):
        raise ValueError("exactly one of text and input_ids must be given")
    if text is not None:
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        ids = tokenizer.encode(text)
    else:
        if not isinstance(input_ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size
            for i in input_ids
        ):
            raise ValueError(f"input_ids must be a list of token ids in [0, {vocab_size})")
        ids = list(input_ids)
    if not ids:
        raise ValueError("the prefix is empty")
    return ids


def _per_item(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for a batch of {n}")
        return value
    return [value] * n


def _check_int(value: Any, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def tokenize_input(
    inp: GenerateInput,
    tokenizer: Tokenizer,
    limits: CoreInfo,
    image_sources: ImageSources | None = None,
) -> list[GenerateRequest]:
    """Validate and tokenize; one GenerateRequest per (prompt, sample). Raises ValueError, also
    for a prompt that can never run on this core (longer than its context or its KV pool).
    `image_sources` says where images may be read from (default: data URLs and base64 only)."""
    vocab_size = limits.vocab_size
    if (inp.text is None) == (inp.input_ids is None):
        raise ValueError("exactly one of text and input_ids must be given")
    if inp.text is not None:
        texts = inp.text if isinstance(inp.text, list) else [inp.text]
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(
                    f"text must be a string or a list of strings, got {type(t).__name__}"
                )
        prompts = [tokenizer.encode(t) for t in texts]
    else:
        assert inp.input_ids is not None
        raw: list[Any] = inp.input_ids if inp.is_batch else [inp.input_ids]
        prompts = []
        for ids in raw:
            if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids
            ):
                raise ValueError("input_ids must be a list of integers or a list of such lists")
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise ValueError(
                    f"input_ids holds {bad[0]}, outside the vocabulary [0, {vocab_size})"
                )
            prompts.append(list(ids))
    n = len(prompts)
    if n == 0:
        raise ValueError("the batch is empty")
    images = _place_images(inp, prompts, limits, image_sources)
    salt = inp.cache_salt  # a server composed it from a checked one (radixlm.server.auth)
    if salt is not None and not (isinstance(salt, str) and salt):
        raise ValueError("cache_salt must be a non-empty string")
    raw_params = _per_item(inp.sampling_params, n, "sampling_params")
    params = [SamplingParams.from_dict(p) for p in raw_params]
    for p in params:
        p.validate(vocab_size)
    _check_grammars(params)
    logprob = _per_item(inp.return_logprob, n, "return_logprob")
    start = _per_item(inp.logprob_start_len, n, "logprob_start_len")
    top = _per_item(inp.top_logprobs_num, n, "top_logprobs_num")
    rids = _rids(inp, n)
    reqs: list[GenerateRequest] = []
    for i, ids in enumerate(prompts):
        error = prompt_error(len(ids), limits.context_len, limits.max_total_num_tokens)
        if error is not None:
            raise ValueError(error + (" (with its images)" if images[i] else ""))
        _check_room(len(ids), raw_params[i], params[i], limits.context_len)
        s = -1 if start[i] is None else _check_int(start[i], "logprob_start_len", -1)
        if logprob[i] and images[i] and 0 <= s < images[i][-1].end:
            raise ValueError(
                f"logprob_start_len {s} is inside or before an image: prompt logprobs are given "
                f"only for the text after the last image (from position {images[i][-1].end})"
            )
        k = 0 if top[i] is None else _check_int(top[i], "top_logprobs_num", 0)
        rid = rids[i] or uuid.uuid4().hex
        p = params[i]
        for j in range(p.n):
            pj = p
            if p.n > 1 and p.sampling_seed is not None:
                pj = replace(p, sampling_seed=p.sampling_seed + j)
            reqs.append(
                GenerateRequest(
                    rid=rid if p.n == 1 else f"{rid}-{j}",
                    input_ids=ids,
                    params=pj,
                    return_logprob=bool(logprob[i]),
                    logprob_start_len=s,
                    top_logprobs_num=k,
                    images=images[i],
                    cache_salt=salt,
                )
            )
    return reqs


def _place_images(
    inp: GenerateInput,
    prompts: list[list[int]],
    limits: CoreInfo,
    sources: ImageSources | None,
) -> list[tuple[ImageSpan, ...]]:
    """Each prompt's images, its image tokens replaced (in place) by their runs of pad ids."""
    spec = limits.image
    if spec is None:
        if inp.image_data is not None and inp.image_data != []:
            raise ValueError(f"the model {limits.model_path!r} takes no images (text only)")
        return [() for _ in prompts]
    from radixlm.multimodal.inputs import (
        ImageSources,
        load_images,
        per_prompt_images,
        place_images,
    )

    where = sources or ImageSources()
    out = []
    for i, image_list in enumerate(per_prompt_images(inp.image_data, len(prompts))):
        prompts[i], spans = place_images(prompts[i], load_images(image_list, spec, where), spec)
        out.append(spans)
    return out


def _rids(inp: GenerateInput, n: int) -> list[str | None]:
    """One rid per prompt; a batch given one rid numbers its prompts (`rid-0`, ...), as n > 1
    numbers its samples: requests in flight never share a rid."""
    if isinstance(inp.rid, str) and inp.is_batch:
        return [f"{inp.rid}-{i}" for i in range(n)]
    return _per_item(inp.rid, n, "rid")


def _check_room(num_prompt: int, raw: Any, params: SamplingParams, context_len: int) -> None:
    """An explicit max_new_tokens must fit in the context after the prompt (as SGLang, vLLM and
    OpenAI check); the default one is cut at the context instead."""
    if not (isinstance(raw, Mapping) and raw.get("max_new_tokens") is not None):
        return
    total = num_prompt + params.max_new_tokens
    if total > context_len:
        raise ValueError(
            f"the context length is {context_len} tokens, but {total} were requested: "
            f"{num_prompt} in the prompt and {params.max_new_tokens} to generate "
            "(max_new_tokens / max_tokens)"
        )


def _check_grammars(params: list[SamplingParams]) -> None:
    """Reject a bad regex / json_schema / ebnf here (ValueError, a 400 over HTTP), before it is
    queued; each distinct grammar is checked once per call."""
    specs = {GrammarSpec.from_params(p) for p in params}
    for spec in specs:
        if spec is not None:
            validate_spec(spec)


@dataclass
class RequestState:
    """Accumulates one request's outputs and renders SGLang's response dict."""

    req: GenerateRequest
    tokenizer: Tokenizer
    return_text_in_logprobs: bool = False
    created: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    cached_tokens: int = 0
    queue_time: float | None = None  # seconds the engine kept it waiting before admission
    input_logprobs: list[LogprobEntry] = field(default_factory=list)
    input_top_logprobs: list[list[LogprobEntry]] = field(default_factory=list)
    output_logprobs: list[LogprobEntry] = field(default_factory=list)
    output_top_logprobs: list[list[LogprobEntry]] = field(default_factory=list)
    first_token_time: float | None = None
    detok: IncrementalDetokenizer = field(init=False)
    _trimmed: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        p = self.req.params
        self.detok = IncrementalDetokenizer(
            self.tokenizer, p.skip_special_tokens, p.spaces_between_special_tokens
        )

    @property
    def finished(self) -> bool:
        """True after the last output arrived."""
        return self.finish_reason is not None

    def apply(self, out: TokenOutput) -> None:
        """Take in one TokenOutput of this request."""
        if out.new_ids and self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.output_ids.extend(out.new_ids)
        self.detok.push(out.new_ids)
        self.cached_tokens = out.cached_tokens
        self.queue_time = out.queue_time
        self.input_logprobs.extend(out.input_logprobs)
        self.input_top_logprobs.extend(out.input_top_logprobs)
        self.output_logprobs.extend(out.output_logprobs)
        self.output_top_logprobs.extend(out.output_top_logprobs)
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            self.detok.flush()

    @property
    def text(self) -> str:
        """The text so far: cut at a matched stop string; while running, a partial stop held back."""
        text = self.detok.text
        stops = self.req.params.stop
        matched = self.finish_reason.matched if self.finish_reason is not None else None
        if isinstance(matched, int) and not self.req.params.no_stop_trim and self.output_ids:
            # The matched stop token stays in output_ids but not in the text (as SGLang does).
            if self._trimmed is None:
                self._trimmed = self.tokenizer.decode(
                    self.output_ids[:-1],
                    self.req.params.skip_special_tokens,
                    self.req.params.spaces_between_special_tokens,
                )
            return self._trimmed
        if isinstance(matched, str) and matched in self.req.params.stop_regex:
            found = re.search(matched, text)
            if found is None:
                return text
            return text[: found.end() if self.req.params.no_stop_trim else found.start()]
        if not stops:
            return text
        if isinstance(matched, str):
            if self.req.params.no_stop_trim:
                idx = text.find(matched)
                return text[: idx + len(matched)] if idx >= 0 else text
            idx = text.find(matched)
            return text[:idx] if idx >= 0 else text
        if self.finished:
            return text
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[: len(text) - hold]

    def to_dict(self) -> dict[str, Any]:
        """SGLang's response: text, output_ids and meta_info (text and ids are cumulative)."""
        meta: dict[str, Any] = {
            "id": self.req.rid,
            "finish_reason": (None if self.finish_reason is None else self.finish_reason.to_dict()),
            "prompt_tokens": len(self.req.input_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "e2e_latency": time.perf_counter() - self.created,
        }
        if self.req.return_logprob:
            meta["input_token_logprobs"] = self._triples(self.input_logprobs)
            meta["output_token_logprobs"] = self._triples(self.output_logprobs)
            if self.req.top_logprobs_num:
                meta["input_top_logprobs"] = [self._triples(t) for t in self.input_top_logprobs]
                meta["output_top_logprobs"] = [self._triples(t) for t in self.output_top_logprobs]
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}

    def _triples(self, entries: list[LogprobEntry]) -> list[list[Any]]:
        tok = self.tokenizer
        if self.return_text_in_logprobs:
            return [[lp, i, tok.token_text(i)] for lp, i in entries]
        return [[lp, i, None] for lp, i in entries]
