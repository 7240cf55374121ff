"""Programs on a running server over SGLang's native HTTP API (`/generate`)."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from radixlm.lang.backends.native import NativeBackend
from radixlm.lang.chat import ChatTemplate


class RuntimeEndpoint(NativeBackend):
    """A radixlm or SGLang server at `base_url`, driven the way SGLang's frontend drives it."""

    def __init__(
        self, base_url: str, api_key: str | None = None, cache_salt: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.cache_salt = cache_salt
        self.http = _Http(self.base_url, api_key)  # keep-alive, one connection per thread
        self.model_info: dict[str, Any] = self._get("/get_model_info")
        # A server on this machine names a model file to read the chat template from.
        super().__init__(
            ChatTemplate.from_model_path(
                self.model_info.get("model_path"), self.model_info.get("chat_template")
            )
        )
        self.image_token = self.model_info.get("image_token")

    def get_model_name(self) -> str:
        """The server's model path."""
        return str(self.model_info.get("model_path"))

    def _call(self, payload: dict[str, Any]) -> Any:
        status, body = self.http.request("POST", "/generate", payload)
        return _decode(status, body)

    def _call_stream(self, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for line in self.http.stream("/generate", payload):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(event["error"])
            yield event

    def _get(self, path: str) -> Any:
        status, body = self.http.request("GET", path)
        return _decode(status, body)

    def pin_prefix(self, text: str, ttl_s: float) -> dict[str, Any]:
        """POST /cache/pin under this backend's salt."""
        status, body = self.http.request(
            "POST", "/cache/pin", self._salted({"text": text, "ttl_s": ttl_s})
        )
        pin: dict[str, Any] = _decode(status, body)
        return pin

    def flush_cache(self) -> bool:
        """POST /flush_cache; False if the server refused (requests are running)."""
        status, _ = self.http.request("POST", "/flush_cache", {})
        return status == 200

    def get_server_info(self) -> dict[str, Any]:
        """GET /get_server_info."""
        info: dict[str, Any] = self._get("/get_server_info")
        return info


def _decode(status: int, body: bytes) -> Any:
    if status != 200:
        try:
            content: Any = json.loads(body)
        except ValueError:
            content = body.decode(errors="replace")
        raise RuntimeError(content)
    return json.loads(body)


class _Http:
    """Keep-alive HTTP/1.1 connections, one per thread (http.client connections are not shared)."""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port], got {base_url!r}")
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port
        self._path = url.path
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """Send one request; a keep-alive connection the server closed is reopened once."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(2):
            conn = getattr(self._local, "conn", None) or self._connect()
            self._local.conn = conn
            try:
                conn.request(method, self._path + path, body=data, headers=self._headers)
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def stream(self, path: str, body: Any) -> Iterator[bytes]:
        """POST and yield the response's lines (a connection of its own, closed at the end)."""
        conn = self._connect()
        try:
            conn.request(
                "POST", self._path + path, body=json.dumps(body).encode(), headers=self._headers
            )
            resp = conn.getresponse()
            if resp.status != 200:
                _decode(resp.status, resp.read())
            while line := resp.readline():
                yield line.rstrip(b"\r\n")
        finally:
            conn.close()
