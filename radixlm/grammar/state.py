"""One request's grammar state: its matcher, jump-forward, and the draft protocol.

Jump-forward (SGLang's compressed FSM): after the sampled token is accepted, the text the
grammar forces next is appended to the request's output, and the next step feeds it in one extend
instead of one decode per token. The appended tokens are the tokenizer's own for the output text:

- The sampled token may merge with the forced text (`"` then `, "age"` is canonically `",` then
  ` "age"`), so the two are retokenized together. It has no KV yet and has not been sent, so
  replacing it costs nothing; tokens before it are context that never changes.
- llguidance's forced tokens stop short of forced text that could merge with what the model
  writes next: ` "` before a string value (the vocabulary has ` ""`, ` "$`, ...), ` ` before an
  integer (` -`). Its first token is appended too, as a *draft*, as in speculative decoding: it
  is fed with the rest, so the same forward also gives the logits of the position before it.
  The step samples there too (mask: the grammar before the draft), and `settle` keeps the draft
  if the model's own token there is the draft (the token sampled after it is the step's token: a
  forward pass saved), or replaces it (the draft's KV slot is freed by the scheduler, which keeps
  K/V only for the tokens that did not change; a draft is private, never in the radix tree) and
  drops the sample after the draft, which costs what decoding without jump-forward costs. Either
  way the output is what the model writes one token at a time, so greedy text is the same as
  without jump-forward.
"""

from __future__ import annotations

from collections.abc import Sequence

from radixlm.cache.radix import common_prefix_len
from radixlm.core.request import Req
from radixlm.grammar.base import GrammarBackend, GrammarMatcher

# Tokens before a jump that retokenization reads as context; they are never changed.
_CONTEXT_TOKENS = 2


class GrammarState:
    """A request's matcher, always after all of its output_ids (drafts included)."""

    __slots__ = ("matcher", "backend", "jump_forward", "num_draft")

    def __init__(
        self, matcher: GrammarMatcher, backend: GrammarBackend, jump_forward: bool
    ) -> None:
        self.matcher, self.backend, self.jump_forward = matcher, backend, jump_forward
        self.num_draft = 0  # 0 or 1: the last output token is a draft

    @property
    def error(self) -> str | None:
        """Why the matcher failed; None while it is fine."""
        return self.matcher.error

    @property
    def is_terminated(self) -> bool:
        """Whether the output is complete."""
        return self.matcher.is_terminated

    def start(self, req: Req, context_len: int) -> list[int]:
        """The output before the first forward: the forced start (`{"name": "`), possibly with a
        draft at its end; empty when nothing is forced. The caller makes it req's output."""
        if not self._may_jump(req):
            return []
        return self._jump(req, 0, [], context_len)

    def settle(self, req: Req, sampled: Sequence[int], context_len: int) -> tuple[int, list[int]]:
        """Verify the draft, accept the step's token and jump forward (see OutputGrammar)."""
        keep, token = len(req.output_ids), sampled[-1]
        if self.num_draft:
            assert len(sampled) == 2, "one row where the draft was fed, one after it"
            self.num_draft = 0
            if sampled[0] != req.output_ids[-1]:  # the model writes another token there
                keep -= 1
                self.matcher.rollback(1)
                token = sampled[0]  # and the sample after the draft is moot
        accepted = self.matcher.accept([token])
        if not accepted or self.matcher.is_terminated or not self._may_jump(req):
            return keep, [token]  # a rejected token leaves matcher.error set
        return keep, self._jump(req, keep, [token], context_len)

    def _may_jump(self, req: Req) -> bool:
        # Forced tokens are never sampled, so they have no logprobs to report; and stop strings
        # are only looked for in the last few tokens of each step, which a long jump could pass.
        p = req.params
        return self.jump_forward and not req.return_logprob and not (p.stop or p.stop_regex)

    def _jump(self, req: Req, keep: int, pending: list[int], context_len: int) -> list[int]:
        """The output tail from position keep: pending (accepted, not yet run nor sent) and the
        forced continuation, retokenized together, then a draft of the forced text that
        llguidance's forced tokens hold back; sets num_draft."""
        matcher = self.matcher
        out_len = keep + len(pending)
        room = min(req.params.max_new_tokens - out_len, context_len - len(req.input_ids) - out_len)
        forced_text = matcher.forced_bytes() if room > 0 else b""
        if not forced_text:
            return pending
        context = _context(req, keep)
        joined = pending + matcher.forced_tokens()
        final = self.backend.retokenize(context, joined) or joined  # whatever the model writes next
        full = self.backend.retokenize(context, pending, forced_text)  # as if nothing followed
        draft = full[len(final) : len(final) + 1] if full and full[: len(final)] == final else []
        tokens = (final + draft)[: len(pending) + room]
        num_final = min(len(final), len(tokens))
        same = common_prefix_len(tokens, pending, 0)
        matcher.rollback(len(pending) - same)
        if matcher.num_valid(tokens[same:]) < len(tokens) - same:
            tokens, num_final = pending, len(pending)  # (not expected: the same text) no jump
        matcher.accept(tokens[same:])
        self.num_draft = len(tokens) - num_final
        return tokens


def _context(req: Req, keep: int) -> list[int]:
    """The last few tokens before output position keep (prompt tokens if the output is short)."""
    tail = req.output_ids[max(0, keep - _CONTEXT_TOKENS) : keep]
    if len(tail) < _CONTEXT_TOKENS:
        tail = req.input_ids[len(tail) - _CONTEXT_TOKENS :] + tail
    return tail
