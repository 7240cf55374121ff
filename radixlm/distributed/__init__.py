"""Tensor parallelism: a model's heads and MLP columns cut over ranks, rank 0 scheduling."""
