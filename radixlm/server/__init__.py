"""The HTTP server: SGLang's native API and OpenAI's, over an engine process."""
