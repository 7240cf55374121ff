"""The types every layer shares: requests, step plans, forward batches, messages, finish reasons.

A leaf: nothing in radixlm.core imports another radixlm package.
"""
