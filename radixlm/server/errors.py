"""The errors the HTTP API answers with, in OpenAI's body shape."""

from __future__ import annotations

from radixlm.server.openapi import ErrorResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A request that fails with an HTTP status and an OpenAI-style error body; the app answers
    any ApiError a route raises (radixlm.server.app), so routes never map errors themselves."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> ErrorResponse:
        """`{"error": {message, type, param, code}}`, as OpenAI's clients parse it."""
        return error_body(self.status, self.message, self.param)

    def headers(self) -> dict[str, str]:
        """Extra response headers."""
        return {}


def error_body(status: int, message: str, param: str | None = None) -> ErrorResponse:
    """The error object for a status; `code` is the HTTP status, as SGLang sends it."""
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class RequestFailed(ApiError):
    """A request that ended without its answer (500 unless a subclass says otherwise)."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(type(self).status, message)


class EngineUnavailable(RequestFailed):
    """The engine is still starting, or it is gone or stopping: 503, wherever it is raised; with
    Retry-After when trying again soon should work."""

    status = 503

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        """When to try again, in seconds."""
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


class Overloaded(EngineUnavailable):
    """Too many requests are queued: 503 with Retry-After, refused before any work is done."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=1)
