"""Tenants over HTTP: cache_salt and tenant keys isolate cached K/V (cached_tokens shows none
across tenants), public prefixes are shared, admin routes answer 401/403, pins and their quota,
and GET /cache against what the requests cached."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import ServerProcess
from tenants_harness import PIN_QUOTA, client

PROMPT = list(range(100, 140))  # 40 tokens
PUBLIC = list(range(500, 530))  # 30 tokens


@pytest.fixture(scope="module")
def server(tenant_server: ServerProcess) -> ServerProcess:
    return tenant_server


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> Iterator[httpx.Client]:
    with client(server, "admin-key") as c:
        yield c


@pytest.fixture(scope="module")
def acme(server: ServerProcess) -> Iterator[httpx.Client]:
    with client(server, "acme-key") as c:
        yield c


@pytest.fixture(scope="module")
def beta(server: ServerProcess) -> Iterator[httpx.Client]:
    with client(server, "beta-key") as c:
        yield c


@pytest.fixture(autouse=True)
def fresh(admin: httpx.Client) -> Iterator[None]:
    assert admin.post("/flush_cache").status_code == 200
    yield
    assert admin.get("/internal/check_invariant").json() == {"ok": True}


def cached(c: httpx.Client, ids: list[int], salt: str | None = None) -> int:
    body: dict[str, Any] = {"input_ids": ids, "sampling_params": {"max_new_tokens": 2}}
    if salt is not None:
        body["cache_salt"] = salt
    r = c.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return int(r.json()["meta_info"]["cached_tokens"])


def test_isolation_table(admin: httpx.Client, acme: httpx.Client, beta: httpx.Client) -> None:
    full = len(PROMPT) - 1
    rows = [
        (acme, None, 0),  # first sight
        (acme, None, full),
        (beta, None, 0),  # a probe tenant sends acme's exact prompt: nothing cached for it
        (admin, None, 0),  # admins share the unsalted namespace, which acme never wrote
        (acme, "s2", 0),  # a tenant's own salts are apart too
        (acme, "s2", full),
        (beta, "s2", 0),  # the same cache_salt under another tenant is another salt
        (admin, "acme", 0),  # an admin's cache_salt is not a user's tenant salt
        (beta, None, full),
        (acme, None, full),
    ]
    assert [cached(c, PROMPT, salt) for c, salt, _ in rows] == [want for *_, want in rows]


def test_openai_routes_take_cache_salt(acme: httpx.Client, beta: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2, "cache_salt": "chat-1"}
    r = acme.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert cached(acme, PROMPT, "chat-1") == len(PROMPT) - 1
    assert cached(acme, PROMPT) == 0
    r = beta.post("/v1/completions", json=body)
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    bad = acme.post("/v1/completions", json={**body, "cache_salt": ""})
    assert bad.status_code == 400 and "cache_salt" in bad.text


def test_public_prefix_is_shared_and_the_rest_isolated(
    admin: httpx.Client, acme: httpx.Client, beta: httpx.Client
) -> None:
    r = admin.post("/cache/public_prefix", json={"input_ids": PUBLIC})
    assert r.status_code == 200 and r.json()["input_ids"] == PUBLIC
    a, b = PUBLIC + [7, 8, 9], PUBLIC + [7, 8, 9]
    assert cached(acme, a) == 0
    assert cached(beta, b) == len(PUBLIC)  # the public part, not acme's tail
    assert cached(acme, a) == len(a) - 1
    assert cached(beta, [1] + PUBLIC) == 0  # starts elsewhere: isolated from the first token


# (method, path, body, what the admin gets: this server has no disk tier to clear)
ADMIN_ROUTES = [
    ("post", "/flush_cache", None, 200),
    ("post", "/cache/public_prefix", {"input_ids": [1, 2]}, 200),
    ("get", "/internal/check_invariant", None, 200),
    ("get", "/cache_events", None, 200),
    ("post", "/hicache/storage-backend/clear", None, 400),
    ("get", "/clear_hicache_storage_backend", None, 400),
    ("post", "/clear_hicache_storage_backend", None, 400),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), ADMIN_ROUTES)
def test_admin_routes_answer_401_without_a_key_and_403_to_users(
    server: ServerProcess, acme: httpx.Client, method: str, path: str, body: Any, status: int
) -> None:
    kwargs = {"json": body} if body is not None else {}
    with client(server, None) as anonymous:
        assert anonymous.request(method, path, **kwargs).status_code == 401
    with client(server, "wrong-key") as wrong:
        assert wrong.request(method, path, **kwargs).status_code == 401
    r = acme.request(method, path, **kwargs)
    assert r.status_code == 403 and r.json()["error"]["code"] == 403
    with client(server, "admin-key") as admin:
        if path == "/cache_events":  # a stream: its first line is the snapshot
            with admin.stream("GET", path) as s:
                assert s.status_code == 200
        else:
            assert admin.request(method, path, **kwargs).status_code == status


def test_pins_quota_owner_and_view(
    admin: httpx.Client, acme: httpx.Client, beta: httpx.Client
) -> None:
    r = acme.post("/cache/pin", json={"input_ids": PROMPT, "ttl_s": 60})
    assert r.status_code == 200, r.text
    pin = r.json()
    assert pin["tokens"] == len(PROMPT) and pin["tenant"] == "acme"
    assert cached(acme, PROMPT) == len(PROMPT) - 1  # pinned under acme's salt
    assert cached(beta, PROMPT) == 0
    over = acme.post("/cache/pin", json={"input_ids": list(range(200, 200 + PIN_QUOTA))})
    assert over.status_code == 429 and "quota" in over.json()["error"]["message"]
    other = beta.post("/cache/pin", json={"input_ids": list(range(200, 200 + PIN_QUOTA))})
    assert other.status_code == 200  # quotas are per tenant
    view = acme.get("/cache").json()
    assert [p["pin_id"] for p in view["pins"]] == [pin["pin_id"]]
    pinned = [n for n in view["nodes"] if n["pinned"]]
    assert sum(n["tokens"] for n in pinned) == len(PROMPT)
    assert admin.post("/flush_cache").status_code == 200  # ends the pins
    assert acme.delete(f"/cache/pin/{pin['pin_id']}").status_code == 404
    pin = acme.post("/cache/pin", json={"input_ids": PROMPT, "ttl_s": 60}).json()
    assert beta.delete(f"/cache/pin/{pin['pin_id']}").status_code == 404  # not beta's
    assert acme.delete(f"/cache/pin/{pin['pin_id']}").json() == {"unpinned": pin["pin_id"]}
    for bad in ({"input_ids": PROMPT, "ttl_s": 0}, {"input_ids": []}, {"text": "a", "x": 1}):
        assert acme.post("/cache/pin", json=bad).status_code == 400


def test_cache_json_against_the_tree(
    admin: httpx.Client, acme: httpx.Client, beta: httpx.Client
) -> None:
    admin.post("/cache/public_prefix", json={"input_ids": PUBLIC})
    acme.post(
        "/generate", json={"text": "acme secret plan", "sampling_params": {"max_new_tokens": 0}}
    )
    acme.post(
        "/generate", json={"input_ids": PUBLIC + [1, 2], "sampling_params": {"max_new_tokens": 0}}
    )
    beta.post(
        "/generate", json={"text": "beta private note", "sampling_params": {"max_new_tokens": 0}}
    )
    whole = admin.get("/cache").json()
    texts = {n["text"]: n for n in whole["nodes"]}
    assert texts["acme secret plan"]["tenant"] == "acme"
    assert texts["beta private note"]["tenant"] == "beta"
    assert whole["visible_tokens"] == sum(n["tokens"] for n in whole["nodes"])
    stats = admin.get("/server_info").json()["internal_states"][0]
    assert whole["visible_tokens"] == stats["cached_tree_tokens"] == whole["stats"]["tree_tokens"]
    mine = acme.get("/cache").json()
    assert mine["stats"] is None and mine["tenant"] == "acme"
    assert {n["tenant"] for n in mine["nodes"]} == {"acme", None}
    assert not any("beta" in n["text"] for n in mine["nodes"])
    public = [n for n in mine["nodes"] if n["tenant"] is None]
    assert [n["tokens"] for n in public] == [len(PUBLIC)]
    small = admin.get("/cache", params={"max_nodes": 1}).json()
    assert len(small["nodes"]) == 1
    subtree = {n["id"]: n["tokens"] for n in whole["nodes"]}
    for n in sorted(whole["nodes"], key=lambda n: -n["depth"]):  # children before parents
        if n["parent"] != -1:
            subtree[n["parent"]] += subtree[n["id"]]
    roots = [n["id"] for n in whole["nodes"] if n["parent"] == -1]
    (shown,) = small["nodes"]
    assert shown["id"] == max(roots, key=lambda r: subtree[r])  # the biggest subtree first
    assert shown["tokens"] + shown["more_tokens"] == subtree[shown["id"]]
    assert admin.get("/cache", params={"max_nodes": 0}).status_code == 400


def test_the_page_is_served_whole_without_a_key(server: ServerProcess) -> None:
    r = httpx.get(server.url + "/cache/view")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<svg" in r.text and 'fetch("/cache' in r.text
    assert "/*SCRIPT*/" not in r.text and "/*STYLE*/" not in r.text
    assert "http://" not in r.text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in r.text  # nothing from a CDN


def test_a_bad_key_file_stops_the_server(tmp_path: Path, tiny_server_model: Path) -> None:
    from radixlm.server.auth import KeyTable

    bad = tmp_path / "keys.json"
    for text in (
        '{"k": {"tenant": "a b", "role": "user"}}',
        '{"k": {"tenant": "a", "role": "root"}}',
        "[]",
        "{",
    ):
        bad.write_text(text)
        with pytest.raises(ValueError):
            KeyTable.from_file(bad)


def test_runtime_endpoint_salts_programs_and_pins_for_its_tenant(
    server: ServerProcess, acme: httpx.Client, beta: httpx.Client
) -> None:
    import radixlm as sgl
    from radixlm.lang.backends.runtime_endpoint import RuntimeEndpoint

    @sgl.function
    def program(s: Any) -> None:
        s += "shared agent context, tools and rules."
        s["pin"] = s.pin(ttl_s=30)
        s += sgl.gen("out", max_tokens=2, temperature=0)

    endpoint = RuntimeEndpoint(server.url, "acme-key", cache_salt="run-1")
    state = program.run(backend=endpoint)
    pin = state["pin"]
    assert pin["tenant"] == "acme" and pin["tokens"] > 0
    assert state.get_meta_info("out")["cached_tokens"] >= pin["tokens"] - 1
    view = acme.get("/cache").json()
    assert [p["pin_id"] for p in view["pins"]] == [pin["pin_id"]]
    assert beta.get("/cache").json()["pins"] == []  # another tenant's pins are not shown
    body = {"text": state.text(), "sampling_params": {"max_new_tokens": 0}, "cache_salt": "run-1"}
    assert beta.post("/generate", json=body).json()["meta_info"]["cached_tokens"] == 0
    assert acme.post("/generate", json=body).json()["meta_info"]["cached_tokens"] > pin["tokens"]
