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

Budget-aware closing (`close_on_length`, JSON schemas): after the step's tokens (the sampled
one, its jump, a draft it verified), a completion of the output (radixlm/grammar/closing.py)
must still fit in what is left of the budget (`max_new_tokens`, and the context). If none does,
those tokens are replaced at once by their text and its completion, retokenized, if that fits,
else by the shortest completion from before them, and the request ends: the output is a
complete document and the finish reason says `length`. The check a step earlier found a
completion from there that fits, so the document ends within the budget, on its last
token unless the model's token opened more than its length of structure (a `,` before an item).
A check costs ~0.1 ms, so it runs every step only near the end of the budget.
"""

from __future__ import annotations

from collections.abc import Sequence

from radixlm.cache.radix import common_prefix_len
from radixlm.core.request import Req
from radixlm.grammar.base import GrammarBackend, GrammarMatcher
from radixlm.grammar.closing import Closer

# Tokens before a jump that retokenization reads as context; they are never changed.
_CONTEXT_TOKENS = 2
# Closing checks every step while the budget left is within this many tokens (plus twice the
# longest completion seen) of the completion; before that, ever more often as it nears (a step
# takes one token of the model's and what it opens; the forced tokens it adds close as much).
_CLOSE_WINDOW = 16


class GrammarState:
    """A request's matcher, always after all of its output_ids (drafts included)."""

    __slots__ = (
        "matcher",
        "backend",
        "jump_forward",
        "closer",
        "num_draft",
        "closed",
        "_skip",
        "_longest",
    )

    def __init__(
        self,
        matcher: GrammarMatcher,
        backend: GrammarBackend,
        jump_forward: bool,
        closer: Closer | None = None,
    ) -> None:
        self.matcher, self.backend, self.jump_forward = matcher, backend, jump_forward
        self.closer = closer  # None: no budget-aware closing
        self.num_draft = 0  # 0 or 1: the last output token is a draft
        self.closed = False  # the output was ended by closing
        self._skip = 0  # steps before closing checks again
        self._longest = 0  # the longest completion a check found

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
        tail = self._jump(req, 0, [], context_len)
        ending = self._close(req, 0, tail, context_len) if tail else None
        return tail if ending is None else ending

    def settle(self, req: Req, sampled: Sequence[int], context_len: int) -> tuple[int, list[int]]:
        """Verify the draft, accept the step's token, jump forward, and close the output if it
        leaves no room to end (see OutputGrammar)."""
        keep, token = len(req.output_ids), sampled[-1]
        base = keep  # where closing may start: before a draft verified in this step too
        if self.num_draft:
            assert len(sampled) == 2, "one row where the draft was fed, one after it"
            self.num_draft, base = 0, keep - 1
            if sampled[0] != req.output_ids[-1]:  # the model writes another token there
                keep -= 1
                self.matcher.rollback(1)
                token = sampled[0]  # and the sample after the draft is moot
        if not self.matcher.accept([token]):
            return keep, []  # not output: the matcher's error ends the request
        if self.matcher.is_terminated:
            return keep, [token]
        tail = self._jump(req, keep, [token], context_len) if self._may_jump(req) else [token]
        ending = self._close(req, base, req.output_ids[base:keep] + tail, context_len)
        return (keep, tail) if ending is None else (base, ending)

    def accept_draft(self, tokens: Sequence[int]) -> int:
        """Accept the longest prefix of a speculative draft the grammar allows, ending at a
        token that completes it: a forbidden token ends the draft. With closing, a draft is at
        most half the steps the closing check is skipping, so it never outruns the check."""
        if self.num_draft:
            return 0
        limit = len(tokens) if self.closer is None else min(len(tokens), self._skip // 2)
        n = self.matcher.num_valid(tokens[:limit])
        accepted = 0
        while accepted < n and not self.matcher.is_terminated:
            self.matcher.accept(tokens[accepted : accepted + 1])
            accepted += 1
        if self.closer is not None:
            self._skip -= accepted
        return accepted

    def reject_draft(self, num_tokens: int) -> None:
        """Step back over the last num_tokens of a speculative draft."""
        self.matcher.rollback(num_tokens)

    def _close(self, req: Req, keep: int, tail: list[int], context_len: int) -> list[int] | None:
        """The end of the output from position keep if after tail (accepted: the step's token,
        its jump, a draft it verified) no completion would fit in the budget: tail and its
        completion retokenized if that fits, else the shortest completion from keep, accepted
        in tail's place. None while one would fit (or none ever will: a budget too small from
        the start), and without a closer.

        A draft at tail's end is left out of the check, unless tail ends the budget: the model
        may write a longer token in its place (` false` for ` `), and if it keeps the draft, a
        later closing starts before it.
        """
        if self.closer is None or self.is_terminated:
            return None
        if self._skip:
            self._skip -= 1
            return None
        budget = min(req.params.max_new_tokens, context_len - len(req.input_ids)) - keep
        context = _context(req, keep)
        draft = self.num_draft if len(tail) < budget else 0  # a last token is no draft
        done = len(tail) - draft
        self.matcher.rollback(draft)
        rest = self.closer.complete(self.matcher, [*context, *tail[:done]][-_CONTEXT_TOKENS:])
        self.matcher.accept(tail[done:])
        if rest is not None and done + len(rest) <= budget:
            self._longest = max(self._longest, len(rest))
            slack = budget - done - len(rest) - 2 * self._longest - _CLOSE_WINDOW
            self._skip = max(0, slack // 2)
            return None
        self.matcher.rollback(len(tail))
        ending = None
        if rest is not None:  # the model's text kept, if it fits with the completion after it
            ending = self.closer.canonical(self.matcher, context, tail[:done] + rest)
        if ending is None or len(ending) > budget:
            ending = self.closer.complete(self.matcher, context)
        if ending is None or len(ending) > budget:
            self.matcher.accept(tail)
            if rest is None:  # no completion within the closer's bound: look again later
                self._skip = _CLOSE_WINDOW
            return None
        self.matcher.accept(ending)
        self.num_draft, self.closed = 0, True
        return ending

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
