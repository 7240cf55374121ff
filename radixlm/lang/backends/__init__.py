"""Backends: where a program's generations run (in-process Engine, HTTP, OpenAI API)."""
