"""Model definitions, and reading their configs and weights from files."""
