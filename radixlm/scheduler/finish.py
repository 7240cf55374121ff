"""When a request is done: end of sequence, a complete grammar, a stop string, a length limit
(or a grammar closed to fit it)."""

from __future__ import annotations

import re

from radixlm.core.finish import FinishReason
from radixlm.core.request import Req
from radixlm.tokenizer import Tokenizer

# Output tokens searched for a stop regex (a stop string needs only its own length).
_STOP_REGEX_WINDOW = 64


def finish_reason(req: Req, tokenizer: Tokenizer, context_len: int) -> FinishReason | None:
    """SGLang's finish reason for req after its latest tokens, or None while it goes on."""
    p = req.params
    if req.grammar is not None and req.grammar.error is not None:
        return FinishReason.abort(f"grammar error: {req.grammar.error}")
    if req.grammar is not None and req.grammar.closed:
        return FinishReason.at_length(len(req.output_ids))
    token = req.output_ids[-1]
    if token in req.eos_ids and len(req.output_ids) >= p.min_new_tokens:
        return FinishReason.stop(token)
    if req.grammar is not None and req.grammar.is_terminated:
        # Complete: nothing was matched (a matched int would be trimmed from the text).
        return FinishReason.stop(None)
    if (p.stop or p.stop_regex) and len(req.output_ids) >= p.min_new_tokens:
        matched = match_stop(req, tokenizer)
        if matched is not None:
            return FinishReason.stop(matched)
    if len(req.output_ids) >= p.max_new_tokens:
        return FinishReason.at_length(p.max_new_tokens)
    if req.seq_len >= context_len:
        return FinishReason.at_length(len(req.output_ids))
    return None


def match_stop(req: Req, tokenizer: Tokenizer) -> str | None:
    """Decode a short tail of the output; the first stop string (or stop regex) found in it."""
    p = req.params
    window = max((len(s) + 8 for s in p.stop), default=0)
    if p.stop_regex:
        window = max(window, _STOP_REGEX_WINDOW)
    tail = tokenizer.decode(req.output_ids[-window:], skip_special_tokens=p.skip_special_tokens)
    for s in p.stop:
        if s in tail:
            return s
    for pattern in p.stop_regex:
        if re.search(pattern, tail):
            return pattern
    return None
