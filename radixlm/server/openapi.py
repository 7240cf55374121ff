"""The OpenAPI document (/openapi.json, /docs): the error body, and helpers that describe routes.

Routes read and check their own bodies (`read_json`, `parse_generate`, `parse_body`), so that
every error keeps OpenAI's shape and no request is validated twice; the schemas published here
describe those bodies and the answers without running on any request. A route declares its
answer with FastAPI's `response_model` and `responses`, and what FastAPI cannot see (the body
it reads by hand, its event stream) with `openapi_extra`; `openapi_document` then moves the
named schemas of the latter into `components`, beside FastAPI's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, TypeAdapter, with_config
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode
from typing_extensions import TypedDict

REF_TEMPLATE = "#/components/schemas/{model}"
# Answers are closed (additionalProperties: false): a key the document does not name fails
# the schema checks, so the document cannot silently fall behind the code.
closed = with_config(ConfigDict(extra="forbid"))


@closed
class ErrorDetail(TypedDict):
    """OpenAI's error object; `code` is the HTTP status, as SGLang sends it."""

    message: str
    type: str
    param: str | None
    code: int


@closed
class ErrorResponse(TypedDict):
    """The body of every error answer, mid-stream error events included."""

    error: ErrorDetail


_ERRORS = {
    400: "Invalid request; the message says why",
    401: "Missing or wrong API key (send `Authorization: Bearer <key>`)",
    403: "The route is for admin keys only",
    404: "Not found: the model named in the request, or the pin",
    429: "The tenant's pinned tokens would pass its quota",
    500: "The KV slot invariant is broken (a bug)",
    503: "The engine is starting, stopping or gone; or the server is full (then with Retry-After)",
}
_RETRY_AFTER = {
    "description": "Seconds to wait before retrying (sent when the server is full)",
    "schema": {"type": "integer"},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses` for the error statuses a route answers, each with the error body."""
    return {status: _error_response(status) for status in statuses}


def _error_response(status: int) -> dict[str, Any]:
    response = {
        "description": _ERRORS[status],
        "content": {"application/json": {"schema": schema_of(ErrorResponse)}},
    }
    if status == 503:
        response["headers"] = {"Retry-After": _RETRY_AFTER}
    return response


def schema_of(shape: Any, mode: JsonSchemaMode = "serialization") -> dict[str, Any]:
    """The JSON schema of a type, its named parts referring to components; the parts travel in
    `$defs` until `openapi_document` moves them there."""
    refs, defs = GenerateJsonSchema(ref_template=REF_TEMPLATE).generate_definitions(
        [(shape, mode, TypeAdapter(shape).core_schema)]
    )
    return {**refs[(shape, mode)], "$defs": defs}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route that reads its own JSON body: the body `model` describes."""
    schema = schema_of(model, "validation")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def event_stream(chunk: Any) -> dict[str, Any]:
    """`openapi_extra` of a route that streams with `stream: true`: server-sent events
    `data: <chunk>` (or an error body, which ends the stream), then `data: [DONE]`."""
    payload = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": schema_of(chunk | ErrorResponse),
    }
    event = {
        "description": "One event (Open API 3.1: the schema describes each event of the stream)",
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "string"}},
        "if": {"properties": {"data": {"const": "[DONE]"}}},
        "else": {"properties": {"data": payload}},
    }
    return {"responses": {"200": {"content": {"text/event-stream": {"schema": event}}}}}


def openapi_document(app: FastAPI, is_open: Callable[[str], bool] | None) -> dict[str, Any]:
    """The document /openapi.json serves (built once): FastAPI's, with the schemas of
    `openapi_extra` in components; with an API key (`is_open` says which paths need none), the
    bearer scheme and a 401 on every route that needs it."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    _move_defs(doc["paths"], schemas)
    if is_open is not None:
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        unauthorized = _error_response(401)
        for path, operations in doc["paths"].items():
            if not is_open(path):
                for operation in operations.values():
                    operation["security"] = [{"apiKey": []}]
                    operation["responses"]["401"] = unauthorized
        _move_defs(unauthorized, schemas)
    app.openapi_schema = doc
    return doc


def _move_defs(node: Any, schemas: dict[str, Any]) -> None:
    """Move every `$defs` under node into `schemas`; one name must always mean one schema."""
    if isinstance(node, list):
        for item in node:
            _move_defs(item, schemas)
    elif isinstance(node, dict):
        for name, schema in node.pop("$defs", {}).items():
            if schemas.setdefault(name, schema) != schema:
                raise ValueError(f"two different schemas are named {name!r}")
        for value in node.values():
            _move_defs(value, schemas)
