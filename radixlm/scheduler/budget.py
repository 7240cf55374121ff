"""The prefill token budget of a step: whole `chunked_prefill_size` chunks while nothing
decodes; while requests decode, as many prefill tokens as keep the step near the target
inter-token latency, by the step costs measured so far."""

from __future__ import annotations

from dataclasses import dataclass

# The fewest prefill tokens a step with decodes carries: below this, GEMMs run far under their
# speed at more rows, and a long prompt would take too many steps to reach its first token.
MIN_PREFILL_TOKENS = 256
# Weight of the newest step in the running cost estimates (steps on a shared CPU are noisy).
_EMA = 0.25
# Steps with fewer prefill tokens than this say too little about the cost of one.
_MIN_SAMPLE_TOKENS = 16


@dataclass(slots=True)
class PrefillBudget:
    """Prefill tokens per step. With `target_s` (seconds; None: fixed chunks) and decodes in
    the step, the cap is (target_s - decode step) / (seconds per prefill token), both running
    averages of the steps `observe` was told about, within [MIN_PREFILL_TOKENS, chunk]."""

    chunk: int  # chunked_prefill_size: the cap when nothing decodes
    target_s: float | None
    decode_s: float = 0.0  # a step of decodes alone (the decode pass), 0 until one is seen
    token_s: float | None = None  # one prefill token's share of a step, None until measured
    # The planned step `observe` times: its prefill tokens and whether it carries decodes.
    _planned: tuple[int, bool] = (0, False)

    def tokens(self, decoding: bool) -> int:
        """The most prefill tokens the next step may carry."""
        if not decoding or self.target_s is None or not self.token_s:
            return self.chunk
        fit = int((self.target_s - self.decode_s) / self.token_s)
        return min(self.chunk, max(MIN_PREFILL_TOKENS, fit))

    def plan(self, prefill_tokens: int, decoding: bool) -> None:
        """Note the step just scheduled, for `observe`."""
        self._planned = (prefill_tokens, decoding)

    def observe(self, seconds: float) -> None:
        """Take in the wall time of the step last planned (its forward and sampling)."""
        prefill, decoding = self._planned
        if prefill == 0:
            if decoding:
                self.decode_s = _average(self.decode_s or None, seconds)
            return
        if prefill < _MIN_SAMPLE_TOKENS:
            return
        per_token = max(seconds - (self.decode_s if decoding else 0.0), 0.0) / prefill
        self.token_s = _average(self.token_s, per_token)


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - _EMA) * old + _EMA * new
