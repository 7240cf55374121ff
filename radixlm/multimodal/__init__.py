"""Images for LLaVA-style models: loading and preprocessing (frontend), encoder outputs (core)."""
