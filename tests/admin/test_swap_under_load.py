"""Point 6, load: repeated swaps while clients keep calling /v1/predict. No request fails, and every
response's outputs are exactly those of the one head version it reports."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.admin.support import AUTH, Apps, admin_client, churn
from tests.helpers import make_settings

CLIENTS = 8
SWAPS = 40


def test_swap_under_load_every_response_matches_one_version(
    admin_store: Path, redis_url: str, client_factory: Callable[..., TestClient], known_ids: list[int]
) -> None:
    # No in-process caches: every request awaits Redis, so swaps land while requests are in flight.
    settings = make_settings(admin_store, redis_url, local_cache_entries=0)
    public = client_factory(settings)
    apps = Apps(public, admin_client(public, settings), public.app.state.runtime)  # type: ignore[attr-defined]
    groups = [known_ids[i::4] for i in range(4)]
    expected: dict[tuple[int, str], list[float]] = {}
    for version in ("v2", "v3"):
        assert apps.admin.put("/admin/v1/heads/churn", json={"version": version}, headers=AUTH).status_code == 200
        for g, ids in enumerate(groups):
            expected[g, version] = churn(apps.predict(ids))
    apps.drain()
    for g in range(len(groups)):
        # Clearly different outputs: v2 moved the churn logit by +3, v3 by -3.
        assert all(a > b for a, b in zip(expected[g, "v2"], expected[g, "v3"], strict=True))

    stop = threading.Event()
    responses: list[tuple[int, int, Any]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        n = k
        while not stop.is_set():
            g = n % len(groups)
            r = apps.public.post("/v1/predict", json={"customer_ids": groups[g]})
            with lock:
                responses.append((g, r.status_code, r.json()))
            n += 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        swap_status = [
            apps.admin.put("/admin/v1/heads/churn", json={"version": ("v2", "v3")[i % 2]}, headers=AUTH).status_code
            for i in range(SWAPS)
        ]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert swap_status == [200] * SWAPS
    assert len(responses) >= 2 * CLIENTS
    assert [s for _, s, _ in responses if s != 200] == []
    seen = set()
    for g, _, body in responses:
        version = body["model"]["heads"]["churn"]
        seen.add(version)
        assert churn(body) == expected[g, version], f"response reports churn {version} but has other outputs"
    assert seen == {"v2", "v3"}
