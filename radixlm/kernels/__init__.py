"""Compiled kernels for hot spots the torch ops cover poorly, each with a torch fallback."""
