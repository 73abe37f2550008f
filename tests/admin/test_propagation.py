"""Point 5, in process: the shared head record and its channel, between runtimes on one Redis.

Each public TestClient runs its own event loop in a thread, so two clients are two independent
replicas here (the process-level test is test_replicas.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.config import Settings
from service.runtime import registry
from service.store.store import ModelStore
from tests.admin.support import AUTH, Apps, admin_client
from tests.helpers import make_settings


def _apps(settings: Settings, client_factory: Callable[..., TestClient]) -> Apps:
    public = client_factory(settings)
    return Apps(public, admin_client(public, settings), public.app.state.runtime)  # type: ignore[attr-defined]


def _wait_for(check: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def test_change_reaches_other_runtime_and_record_names_every_head(
    admin_settings: Settings, client_factory: Callable[..., TestClient], r: redis.Redis, known_ids: list[int]
) -> None:
    a = _apps(admin_settings, client_factory)
    b = _apps(admin_settings, client_factory)
    assert a.admin.put("/admin/v1/heads/churn", json={"version": "v2"}, headers=AUTH).json()["propagated"] is True
    assert _wait_for(lambda: b.model()["heads"]["churn"]["version"] == "v2")
    assert b.predict(known_ids)["predictions"] == a.predict(known_ids)["predictions"]
    record = {k.decode(): json.loads(v) for k, v in r.hgetall(a.runtime.manager.channel()).items()}
    assert record == {t: {"version": h["version"], "sha256": h["sha256"]} for t, h in a.model()["heads"].items()}

    assert a.admin.delete("/admin/v1/heads/ltv", headers=AUTH).status_code == 200
    assert _wait_for(lambda: "ltv" not in b.model()["heads"])
    assert a.admin.post("/admin/v1/heads/ltv/rollback", headers=AUTH).status_code == 200
    assert _wait_for(lambda: "ltv" in b.model()["heads"])


def test_runtime_started_later_comes_up_with_current_heads(
    admin_settings: Settings, client_factory: Callable[..., TestClient]
) -> None:
    a = _apps(admin_settings, client_factory)
    assert a.admin.put("/admin/v1/heads/churn", json={"version": "v3"}, headers=AUTH).status_code == 200
    late = _apps(admin_settings, client_factory)  # ready only after its first reconcile
    assert late.model()["heads"]["churn"]["version"] == "v3"


def test_published_sha256_that_differs_from_the_store_is_not_swapped(
    admin_settings: Settings, client_factory: Callable[..., TestClient], r: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    b = _apps(admin_settings, client_factory)
    key = b.runtime.manager.channel()
    caplog.set_level("INFO")
    r.hset(key, mapping={t: json.dumps({"version": h["version"], "sha256": h["sha256"]})
                         for t, h in b.model()["heads"].items()})  # fmt: skip
    r.hset(key, "churn", json.dumps({"version": "v2", "sha256": "0" * 64}))  # tampered
    r.publish(key, json.dumps({"origin": "elsewhere"}))
    assert _wait_for(lambda: "differs from the published" in caplog.text)
    assert b.model()["heads"]["churn"]["version"] == "v1"
    # The refusal is audited like any other head change.
    lines = [json.loads(x.getMessage()) for x in caplog.records if x.name == "onepass.audit"]
    assert lines[-1]["action"] == "reconcile" and lines[-1]["result"].startswith("rejected: invalid_model_artifact")

    # The same record with the store's real sha256 is applied.
    v2 = ModelStore(admin_settings.model_store).load_head("tiny", "v1", "churn", "v2")
    r.hset(key, "churn", json.dumps({"version": "v2", "sha256": v2.sha256}))
    r.publish(key, json.dumps({"origin": "elsewhere"}))
    assert _wait_for(lambda: b.model()["heads"]["churn"]["version"] == "v2")


def test_record_with_path_or_url_is_ignored(
    admin_settings: Settings, client_factory: Callable[..., TestClient], r: redis.Redis
) -> None:
    b = _apps(admin_settings, client_factory)
    key = b.runtime.manager.channel()
    before = b.model()["heads"]
    r.hset(key, mapping={
        "churn": json.dumps({"version": "../../../etc/passwd", "sha256": "0" * 64}),
        "../escape": json.dumps({"version": "v1", "sha256": "0" * 64}),
        "ltv": "not json",
    })  # fmt: skip
    assert b.public.portal is not None
    assert b.public.portal.call(b.runtime.manager.reconcile) == []
    assert b.model()["heads"] == before
    # With one valid entry, the malformed ones are still left alone (not taken as removals).
    r.hset(key, "segment", json.dumps({"version": "v1", "sha256": before["segment"]["sha256"]}))
    assert b.public.portal.call(b.runtime.manager.reconcile) == []
    assert b.model()["heads"] == before


def test_missing_record_is_restored_from_a_running_replica(
    admin_store: Path, redis_url: str, client_factory: Callable[..., TestClient], r: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(registry, "RESYNC_S", 0.2)
    a = _apps(make_settings(admin_store, redis_url), client_factory)
    assert a.admin.put("/admin/v1/heads/churn", json={"version": "v2"}, headers=AUTH).status_code == 200
    key = a.runtime.manager.channel()
    r.delete(key)  # evicted by allkeys-lru, or a FLUSHALL
    assert _wait_for(lambda: r.exists(key) == 1)
    assert json.loads(r.hget(key, "churn"))["version"] == "v2"  # type: ignore[arg-type]
