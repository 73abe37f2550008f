"""Point 4: a head swap keeps every cached embedding; a new encoder (model version) never reads one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import redis
from fastapi.testclient import TestClient

from service.config import Settings
from tests.admin.support import AUTH, Apps, admin_client
from tests.helpers import make_settings, train_tiny_model


def _keys(redis_url: str, namespace: str) -> int:
    r = redis.Redis.from_url(redis_url)
    try:
        return sum(1 for _ in r.scan_iter(f"onepass:emb:{namespace}:*", count=1000))
    finally:
        r.close()


def _apps(settings: Settings, client_factory: Callable[..., TestClient]) -> Apps:
    public = client_factory(settings)
    return Apps(public, admin_client(public, settings), public.app.state.runtime)  # type: ignore[attr-defined]


def test_head_swap_keeps_cached_embeddings(
    admin_store: Path, redis_url: str, client_factory: Callable[..., TestClient], known_ids: list[int]
) -> None:
    # No in-process LRU: every hit below comes from Redis.
    apps = _apps(make_settings(admin_store, redis_url, local_cache_entries=0), client_factory)
    namespace = apps.model()["cache_namespace"]
    assert apps.predict(known_ids)["cache"] == {"hits": 0, "misses": len(known_ids)}
    apps.drain()
    assert apps.predict(known_ids)["cache"] == {"hits": len(known_ids), "misses": 0}

    for version in ("v2", "v3"):
        r = apps.admin.put("/admin/v1/heads/churn", json={"version": version}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = apps.predict(known_ids)
        assert body["model"]["heads"]["churn"] == version
        assert body["cache"] == {"hits": len(known_ids), "misses": 0}
    assert apps.admin.post("/admin/v1/heads/churn/rollback", headers=AUTH).status_code == 200
    assert apps.predict(known_ids)["cache"] == {"hits": len(known_ids), "misses": 0}
    assert apps.model()["cache_namespace"] == namespace
    assert _keys(redis_url, namespace) >= len(known_ids)


def test_new_encoder_version_never_reads_old_entries(
    admin_store: Path, redis_url: str, client_factory: Callable[..., TestClient], known_ids: list[int]
) -> None:
    # A second model version in the same store: same data, another seed, so another encoder.
    assert train_tiny_model(admin_store, seed=1) == "v2"
    old = _apps(make_settings(admin_store, redis_url, model_version="v1", local_cache_entries=0), client_factory)
    assert old.predict(known_ids)["cache"]["misses"] == len(known_ids)
    old.drain()
    old_ns = old.model()["cache_namespace"]
    assert _keys(redis_url, old_ns) == len(known_ids)

    new = _apps(make_settings(admin_store, redis_url, model_version="v2", local_cache_entries=0), client_factory)
    new_model = new.model()
    assert new_model["model"] == {"name": "tiny", "version": "v2"}
    assert new_model["encoder_hash"] != old.model()["encoder_hash"]
    assert new_model["cache_namespace"] != old_ns
    body = new.predict(known_ids)
    assert body["model"]["encoder_hash"] == new_model["encoder_hash"]
    assert body["cache"] == {"hits": 0, "misses": len(known_ids)}
    new.drain()
    assert _keys(redis_url, new_model["cache_namespace"]) == len(known_ids)
    # The old version's entries are untouched and still serve the old version.
    assert _keys(redis_url, old_ns) == len(known_ids)
    assert old.predict(known_ids)["cache"] == {"hits": len(known_ids), "misses": 0}
    # Head changes are shared per model version and encoder: v1's record never reaches v2.
    assert old.runtime.manager.channel() != new.runtime.manager.channel()
