"""The types every layer shares: requests, step plans, forward batches, messages, finish reasons.

Near a leaf: radixlm.core imports no other radixlm package but the radix tree's node type.
"""
