"""A small Python client for a running Kiln server (``kiln serve``); standard library only.

    from kiln.client import Client
    c = Client("http://127.0.0.1:8000")            # token: $KILN_API_TOKEN by default
    c.call("cnn", "classify", images=pixels)        # -> {"classes": [...], "labels": [...], ...}
    png = c.png("cgan", "sample", digit=7, n=16)    # -> PNG bytes of the image grid
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


from kiln import settings
from kiln.values import plain
from kiln.plugin import KilnError


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None,
                 timeout: float = 120) -> None:
        self.url = url.rstrip("/")
        self.token = token if token is not None else settings.api_token()
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None, accept: str = "application/json") -> bytes:
        data = None if body is None else json.dumps(plain(body)).encode()
        headers = {"Accept": accept}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]
            except Exception:  # noqa: BLE001 - not Kiln's JSON error: show the status
                message = e.reason
            raise KilnError(f"{self.url}{path}: HTTP {e.code}: {message}") from None
        except (urllib.error.URLError, OSError) as e:
            raise KilnError(f"cannot reach a Kiln server at {self.url} ({getattr(e, 'reason', e)}); "
                            "start one with `kiln serve` or pass --url") from None

    def models(self) -> list[dict[str, Any]]:
        """The served models with their versions, methods and input schemas."""
        return json.loads(self._request("GET", "/models"))["models"]

    def _path(self, model: str, method: str) -> str:
        name, _, version = model.partition(":")
        return f"/models/{name}/versions/{version}/{method}" if version else f"/models/{name}/{method}"

    def call(self, model: str, method: str, **args: Any) -> dict[str, Any]:
        """Call an inference method of ``model`` (``name`` or ``name:version``); JSON outputs."""
        return json.loads(self._request("POST", self._path(model, method), args))

    def png(self, model: str, method: str, **args: Any) -> bytes:
        """Call a method that returns images and get them as one PNG grid."""
        return self._request("POST", self._path(model, method), args, accept="image/png")
