"""The live cache page in a real browser: headless Chromium (Debian's package) driven by
Playwright loads /cache/view against a running server, requests arrive, and the page must show
the new prefix with its token count, live, and never another tenant's text."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from server_harness import ServerProcess
from tenants_harness import client

CHROMIUM = next((p for n in ("chromium", "chromium-browser") if (p := shutil.which(n))), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tenant_server: ServerProcess) -> ServerProcess:
    return tenant_server


def node_texts(page: Any) -> dict[str, int]:
    """The page's drawn nodes: text -> token count."""
    rects = page.locator("#tree rect.node")
    return {
        rects.nth(i).get_attribute("data-text"): int(rects.nth(i).get_attribute("data-tokens"))
        for i in range(rects.count())
    }


def test_the_page_shows_new_prefixes_live_and_only_the_users_own(
    browser: Any, server: ServerProcess
) -> None:
    with client(server, "admin-key") as admin:
        admin.post("/flush_cache")
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/cache/view#key=acme-key")
    page.wait_for_selector("#status:not(.error)", timeout=10_000)
    prompt = "the acme rollout checklist"
    with client(server, "acme-key") as acme, client(server, "beta-key") as beta:
        r = beta.post(
            "/generate",
            json={"text": "beta quarterly numbers", "sampling_params": {"max_new_tokens": 0}},
        )
        assert r.status_code == 200
        r = acme.post("/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 0}})
        tokens = r.json()["meta_info"]["prompt_tokens"]
    # The page polls: the prefix appears without a reload.
    page.wait_for_function(
        "t => [...document.querySelectorAll('#tree rect.node')].some(r => r.dataset.text === t)",
        arg=prompt,
        timeout=10_000,
    )
    drawn = node_texts(page)
    assert drawn[prompt] == tokens
    assert not any("beta" in text for text in drawn)
    page.locator(f'#tree rect.node[data-text="{prompt}"]').hover()
    assert prompt in page.locator("#tip").inner_text()
    assert page.locator("#tip").is_visible()
    # An admin sees both tenants and the counters over time.
    page.goto(server.url + "/cache/view#key=admin-key")
    page.reload()
    page.wait_for_function(
        "() => document.querySelectorAll('#tree rect.node').length >= 2", timeout=10_000
    )
    drawn = node_texts(page)
    assert prompt in drawn and "beta quarterly numbers" in drawn
    page.wait_for_function("() => document.getElementById('v-pool').textContent !== ''")
    assert page.locator("#c-pool polyline").count() == 1
    # A wrong key is an error on the page, not a tree.
    page.goto(server.url + "/cache/view#key=nope")
    page.reload()
    page.wait_for_selector("#status.error", timeout=10_000)
    assert "API key" in page.locator("#status").inner_text()
    assert errors == []
    page.close()
