"""Speculative decoding without a draft model: drafts from the sequence itself (prompt lookup)
and from the radix tree, verified in the step's one forward."""
