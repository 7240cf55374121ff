"""Draw docs/img/cache_view.png: the live cache page of a SmolLM2 server with three tenants, a
public system prompt and a pin, in headless Chromium (Debian's package, driven by Playwright).

python scripts/cache_view_screenshot.py [--out docs/img/cache_view.png]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from radixlm.server.child_process import ServerProcess

KEYS = {
    "admin-key": {"tenant": "ops", "role": "admin"},
    "acme-key": {"tenant": "acme", "role": "user"},
    "beta-key": {"tenant": "beta", "role": "user"},
    "gamma-key": {"tenant": "gamma", "role": "user"},
}
SYSTEM = "You are a helpful assistant for a software company. Answer briefly and precisely.\n"
QUESTIONS = {
    "acme-key": [
        "How do I rotate an API key?",
        "What is a radix tree?",
        "Summarise our refund policy.",
    ],
    "beta-key": ["Write a haiku about caches.", "How do I rotate an API key?"],
    "gamma-key": ["List three sorting algorithms.", "Explain prefix caching in one line."],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="docs/img/cache_view.png")
    args = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "needs Chromium (apt-get install chromium)"
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.json"
        keys.write_text(json.dumps(KEYS))
        argv = ["--api-key-file", str(keys), "--max-total-tokens", "20000"]
        with ServerProcess.start(argv, Path(tmp) / "server.log", timeout=300) as srv:
            admin = httpx.Client(
                base_url=srv.url, headers={"Authorization": "Bearer admin-key"}, timeout=300
            )
            admin.post("/cache/public_prefix", json={"text": SYSTEM})
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 640})
                page.goto(srv.url + "/cache/view#key=admin-key")
                for round_ in range(2):
                    for key, questions in QUESTIONS.items():
                        user = httpx.Client(
                            base_url=srv.url,
                            headers={"Authorization": f"Bearer {key}"},
                            timeout=300,
                        )
                        for q in questions[: round_ + 2]:
                            user.post(
                                "/generate",
                                json={
                                    "text": SYSTEM + q,
                                    "sampling_params": {"max_new_tokens": 12, "temperature": 0},
                                },
                            )
                        if round_ == 0 and key == "acme-key":
                            user.post(
                                "/cache/pin",
                                json={
                                    "text": SYSTEM + "Project notes: the acme migration plan.",
                                    "ttl_s": 600,
                                },
                            )
                        time.sleep(1.5)
                time.sleep(3)
                page.select_option("#colour", "tenant")
                page.hover("#tree rect.node >> nth=1")
                time.sleep(0.5)
                page.screenshot(path=args.out, full_page=True)
                browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
