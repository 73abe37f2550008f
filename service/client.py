"""A small Python client for product backends: ``OnepassClient(url).predict([1, 2, 3])``."""

from __future__ import annotations

from typing import Any

import httpx


class OnepassClientError(RuntimeError):
    """The server answered with an error (its message is kept) or could not be reached."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class OnepassClient:
    """Synchronous client over one keep-alive connection pool."""

    def __init__(self, base_url: str = "http://localhost:8000", *, timeout_s: float = 10.0) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s)

    def predict(self, customer_ids: list[int]) -> dict[str, Any]:
        """Every head's output for each id (see the server's PredictResponse)."""
        try:
            r = self._http.post("/v1/predict", json={"customer_ids": customer_ids})
        except httpx.HTTPError as e:
            raise OnepassClientError(f"cannot reach {self._http.base_url}: {e}") from e
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
        if r.status_code != 200:
            message = body.get("message", body) if isinstance(body, dict) else body
            raise OnepassClientError(f"HTTP {r.status_code}: {message}", r.status_code, body)
        assert isinstance(body, dict)
        return body

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OnepassClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
