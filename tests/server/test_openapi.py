"""The OpenAPI document (/openapi.json, /docs), and Schemathesis walking the API it describes on a
real server: no 5xx, no hang, no answer outside the document, and the server unharmed after."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import API_KEY, ServerProcess, wait_idle

from radixlm.engine.args import EngineArgs
from radixlm.server.app import create_app
from radixlm.server.tokenizer_manager import TokenizerManager

JSON = "application/json"
TEXT = "text/plain"
NDJSON = "application/x-ndjson"
HTML = "text/html"
JSON_STRING = "application/json (a string)"  # SGLang answers some control routes so
# Every operation, and the media type of its 200 answer (None: an empty body).
ROUTES: dict[tuple[str, str], str | None] = {
    ("post", "/generate"): JSON,
    ("get", "/health"): None,
    ("get", "/health_generate"): None,
    ("get", "/model_info"): JSON,
    ("get", "/get_model_info"): JSON,
    ("get", "/server_info"): JSON,
    ("get", "/get_server_info"): JSON,
    ("post", "/flush_cache"): TEXT,
    ("post", "/hicache/storage-backend/clear"): JSON_STRING,
    ("get", "/clear_hicache_storage_backend"): JSON_STRING,
    ("post", "/clear_hicache_storage_backend"): JSON_STRING,
    ("post", "/abort_request"): JSON,
    ("get", "/metrics"): TEXT,
    ("get", "/internal/check_invariant"): JSON,
    ("get", "/v1/models"): JSON,
    ("post", "/v1/completions"): JSON,
    ("post", "/v1/chat/completions"): JSON,
    ("get", "/cache_events"): NDJSON,
    ("get", "/cache"): JSON,
    ("get", "/cache/view"): HTML,
    ("post", "/cache/pin"): JSON,
    ("delete", "/cache/pin/{pin_id}"): JSON,
    ("post", "/cache/public_prefix"): JSON,
}
BODIES = {
    "/generate": "GenerateReqInput",
    "/abort_request": "AbortReqInput",
    "/v1/completions": "CompletionRequest",
    "/v1/chat/completions": "ChatCompletionRequest",
    "/cache/pin": "PinInput",
    "/cache/public_prefix": "PublicPrefixInput",
}
STREAMS = {"/generate", "/v1/completions", "/v1/chat/completions"}
OPEN = {"/health", "/health_generate", "/metrics", "/cache/view"}
REF = "#/components/schemas/"

# Schemathesis runs its coverage phase (a fixed set of boundary and invalid values per operation)
# and then MAX_EXAMPLES generated cases per operation, all within FUZZ_TIMEOUT_S; a request not
# answered within REQUEST_TIMEOUT_S counts as a hang. The seed makes a failure reproducible.
MAX_EXAMPLES = 50
FUZZ_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 30
SKIPPED_CHECKS = {
    # JSON Schema cannot state all of a body's rules (the prompt must fit the context, exactly
    # one grammar, min_new_tokens <= max_new_tokens), so some schema-valid bodies rightly get
    # a 400. The converse, negative_data_rejection, runs: what the schema forbids is a 4xx.
    "positive_data_acceptance",
}


@pytest.fixture(scope="module")
def fuzzed(start_tiny_server: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    """A server of its own, which the fuzzer flushes and aborts; a 64-token context keeps every
    generation short, and a small queue puts "too many requests" within the fuzzer's reach."""
    srv = start_tiny_server(
        "--context-length", "64", "--max-running-requests", "4", "--max-queued-requests", "4"
    )
    yield srv
    code = srv.stop()
    assert code in (0, -signal.SIGTERM), srv.log()


@pytest.fixture(scope="module")
def document(fuzzed: ServerProcess) -> dict[str, Any]:
    """/openapi.json, fetched without the API key."""
    r = httpx.get(fuzzed.url + "/openapi.json")
    assert r.status_code == 200, r.text
    return r.json()


def component(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """The component a `$ref` schema names."""
    assert schema["$ref"].startswith(REF), schema
    return document["components"]["schemas"][schema["$ref"][len(REF) :]]


def refs(node: Any) -> Iterator[str]:
    """Every `$ref` under node."""
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def test_the_document_names_every_route(document: dict[str, Any]) -> None:
    assert {(m, p) for p, ops in document["paths"].items() for m in ops} == set(ROUTES)
    names = document["components"]["schemas"]
    assert {r[len(REF) :] for r in refs(document)} <= set(names)


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_has_real_schemas(document: dict[str, Any], method: str, path: str) -> None:
    operation = document["paths"][path][method]
    responses = operation["responses"]
    media = ROUTES[(method, path)]
    ok = responses["200"]
    if media is None:
        assert "content" not in ok
    elif media == TEXT:
        assert ok["content"][TEXT]["schema"] == {"type": "string"}
    elif media == HTML:
        assert ok["content"][HTML]["schema"] == {"type": "string"}
    elif media == JSON_STRING:
        assert ok["content"][JSON]["schema"]["type"] == "string"
    elif media == NDJSON:
        assert component(document, ok["content"][NDJSON]["schema"])["properties"]
    else:
        schema = ok["content"][JSON]["schema"]
        first = schema["anyOf"][0] if "anyOf" in schema else schema  # /generate: one or a list
        assert component(document, first)["properties"]
    for status, answer in responses.items():
        if status != "200":
            error = component(document, answer["content"][JSON]["schema"])
            assert set(error["properties"]) == {"error"}, (status, error)
    if path in BODIES:
        body = operation["requestBody"]
        assert body["required"] is True
        assert body["content"][JSON]["schema"] == {"$ref": REF + BODIES[path]}
        assert component(document, body["content"][JSON]["schema"])["properties"]
    else:
        assert "requestBody" not in operation
    assert ("text/event-stream" in ok.get("content", {})) == (path in STREAMS)
    needs_key = path not in OPEN
    assert ("401" in responses) == needs_key
    assert (operation.get("security") == [{"apiKey": []}]) == needs_key


def test_the_docs_page_needs_no_key(fuzzed: ServerProcess, document: dict[str, Any]) -> None:
    r = httpx.get(fuzzed.url + "/docs")
    assert r.status_code == 200 and "/openapi.json" in r.text
    assert document["components"]["securitySchemes"] == {
        "apiKey": {"type": "http", "scheme": "bearer"}
    }


def test_without_a_key_the_document_asks_for_none() -> None:
    app = create_app(TokenizerManager(EngineArgs(model_path="unused")))
    doc = app.openapi()
    assert "securitySchemes" not in doc["components"]
    assert not any("401" in op["responses"] for ops in doc["paths"].values() for op in ops.values())


def test_schemathesis_finds_no_server_error_hang_or_schema_break(
    fuzzed: ServerProcess, tmp_path: Path
) -> None:
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", fuzzed.url + "/openapi.json",
        "--header", f"Authorization: Bearer {API_KEY}",
        "--checks", "all",
        "--exclude-checks", ",".join(SKIPPED_CHECKS),
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "0",
        "--request-timeout", str(REQUEST_TIMEOUT_S),
        "--workers", "1",
        "--exclude-path", "/cache_events",  # a stream that lasts while its listener does
        "--no-shrink",
        "--output-sanitize", "false",  # the key is a test key; values stay readable
    ]  # fmt: skip
    try:
        # In tmp_path: no config file of the checkout is read, no .hypothesis folder is left.
        proc = subprocess.run(
            command, cwd=tmp_path, capture_output=True, text=True, timeout=FUZZ_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        pytest.fail(f"Schemathesis did not finish in {FUZZ_TIMEOUT_S} s:\n{out[-30000:]}")
    assert proc.returncode == 0, proc.stdout[-30000:] + proc.stderr[-3000:]
    with fuzzed.client() as http:
        assert http.get("/health").status_code == 200
        wait_idle(http, timeout=10)
        assert http.get("/internal/check_invariant").json() == {"ok": True}
        r = http.post("/generate", json={"text": "still", "sampling_params": {"max_new_tokens": 3}})
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 3
    assert "Traceback" not in fuzzed.log()
