"""Points 2 and 3: list, swap (by reference or upload), roll back, add and remove heads."""

from __future__ import annotations

import hashlib

import pytest

from service.store.store import ModelStore
from service.training.head_trainer import train_new_head
from tests.admin.support import AUTH, OCTET, Apps, churn, head_bytes, shifted_head


def test_model_lists_encoder_heads_and_cache_namespace(apps: Apps) -> None:
    body = apps.model()
    served = apps.runtime.served
    assert served is not None
    assert body["model"] == {"name": "tiny", "version": "v1"}
    assert body["encoder_hash"] == served.model.encoder_hash
    assert body["cache_namespace"] == f"{served.model.encoder_hash}:{served.graph.snapshot_id}"
    assert set(body["heads"]) == {"churn", "ltv", "segment"}
    for task, head in body["heads"].items():
        assert head["version"] == "v1"
        assert head["sha256"] == served.model.heads[task].sha256
        assert head["loaded_at"]
        assert head["previous"] == []


def test_swap_by_reference_serves_new_version(apps: Apps, known_ids: list[int]) -> None:
    before = apps.predict(known_ids)
    r = apps.admin.put("/admin/v1/heads/churn", json={"version": "v2"}, headers=AUTH)
    assert r.status_code == 200, r.text
    report = r.json()
    store = ModelStore(apps.runtime.settings.model_store)
    v2 = store.load_head("tiny", "v1", "churn", "v2")
    assert report["action"] == "swap"
    assert report["old"]["version"] == "v1"
    assert report["new"] == {"version": "v2", "sha256": v2.sha256}
    # The output bias moved by +3: every golden probability rises, so the drift is large and positive.
    assert report["drift"]["golden_size"] > 0
    assert 0.1 < report["drift"]["mean_abs"] <= report["drift"]["max_abs"] < 1.0
    after = apps.predict(known_ids)
    assert after["model"]["heads"] == {"churn": "v2", "ltv": "v1", "segment": "v1"}
    assert all(b > a for a, b in zip(churn(before), churn(after), strict=True))
    assert apps.model()["heads"]["churn"]["previous"] == ["v1"]


def test_rollback_restores_previous_head_exactly(apps: Apps, known_ids: list[int]) -> None:
    before = apps.predict(known_ids)
    assert apps.admin.put("/admin/v1/heads/churn", json={"version": "v2"}, headers=AUTH).status_code == 200
    r = apps.admin.post("/admin/v1/heads/churn/rollback", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["old"]["version"] == "v2"
    assert r.json()["new"]["version"] == "v1"
    after = apps.predict(known_ids)
    assert after["model"]["heads"]["churn"] == "v1"
    assert churn(after) == churn(before)


def test_rollback_without_previous_head_returns_404(apps: Apps) -> None:
    r = apps.admin.post("/admin/v1/heads/churn/rollback", headers=AUTH)
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"
    assert r.json()["message"] == "task 'churn' has no previous head to roll back to"


def test_swap_upload_is_verified_stored_and_served(apps: Apps, known_ids: list[int]) -> None:
    store = ModelStore(apps.runtime.settings.model_store)
    data = head_bytes(shifted_head(store, "tiny", "churn", 1.5))
    r = apps.admin.put("/admin/v1/heads/churn", content=data, headers=OCTET)
    assert r.status_code == 200, r.text
    new = r.json()["new"]
    # Stored as the next head version, so other replicas can load (and verify) it by name.
    assert new["version"] == "v4"
    stored = store.load_head("tiny", "v1", "churn", "v4")
    assert new["sha256"] == stored.sha256
    assert stored.metrics["upload_sha256"] == hashlib.sha256(data).hexdigest()
    assert apps.predict(known_ids)["model"]["heads"]["churn"] == "v4"
    assert apps.model()["heads"]["churn"]["sha256"] == stored.sha256


def test_swap_unknown_version_returns_404(apps: Apps) -> None:
    r = apps.admin.put("/admin/v1/heads/churn", json={"version": "v99"}, headers=AUTH)
    assert r.status_code == 404
    assert r.json()["message"] == "task 'churn' has no head version 'v99' in tiny/v1"


def test_swap_unserved_task_returns_404(apps: Apps) -> None:
    r = apps.admin.put("/admin/v1/heads/nosuchtask", json={"version": "v1"}, headers=AUTH)
    assert r.status_code == 404
    assert "task 'nosuchtask' is not served" in r.json()["message"]


def test_swap_head_of_other_kind_returns_422(apps: Apps) -> None:
    # A segment (multiclass) head stored under the churn task: its kind and classes differ.
    store = ModelStore(apps.runtime.settings.model_store)
    model = store.load("tiny")
    seg = model.heads["segment"].build(model.config.hidden)
    seg.spec = type(seg.spec)("churn", "multiclass", seg.spec.classes, seg.spec.hidden)
    version = store.save_head("tiny", "v1", seg, trained_on=model.encoder_hash, metrics={})
    r = apps.admin.put("/admin/v1/heads/churn", json={"version": version}, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_model_artifact"
    assert "kind/classes multiclass" in r.json()["message"]
    assert apps.model()["heads"]["churn"]["version"] == "v1"


def test_swap_head_trained_on_other_encoder_returns_422(apps: Apps) -> None:
    store = ModelStore(apps.runtime.settings.model_store)
    head = shifted_head(store, "tiny", "churn", 0.5)
    version = store.save_head("tiny", "v1", head, trained_on="0123456789abcdef", metrics={})
    r = apps.admin.put("/admin/v1/heads/churn", json={"version": version}, headers=AUTH)
    assert r.status_code == 422
    assert "was trained on encoder 0123456789abcdef" in r.json()["message"]


def test_train_head_then_add_serves_new_task_until_deleted(apps: Apps, known_ids: list[int]) -> None:
    settings = apps.runtime.settings
    hv, metrics = train_new_head(
        settings.model_store, "tiny", None, "active_30d", labels=None, demo_task="active_30d", kind=None,
        epochs=3, seed=0, data_dir=None, device="cpu",
    )  # fmt: skip
    assert hv == "v1" and metrics["kind"] == "binary"
    r = apps.admin.post("/admin/v1/heads", json={"task": "active_30d", "version": hv}, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["action"] == "add"
    assert r.json()["old"] is None and r.json()["new"]["version"] == "v1"
    body = apps.predict(known_ids)
    assert body["model"]["heads"]["active_30d"] == "v1"
    assert all(0.0 <= p["active_30d_probability"] <= 1.0 for p in body["predictions"])
    assert apps.model()["heads"]["active_30d"]["kind"] == "binary"

    r = apps.admin.delete("/admin/v1/heads/active_30d", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["new"] is None
    body = apps.predict(known_ids)
    assert "active_30d" not in body["model"]["heads"]
    assert all("active_30d_probability" not in p for p in body["predictions"])
    # A removed head can be rolled back.
    assert apps.admin.post("/admin/v1/heads/active_30d/rollback", headers=AUTH).status_code == 200
    assert "active_30d_probability" in apps.predict(known_ids)["predictions"][0]


def test_add_served_task_returns_409(apps: Apps) -> None:
    r = apps.admin.post("/admin/v1/heads", json={"task": "churn", "version": "v2"}, headers=AUTH)
    assert r.status_code == 409
    assert r.json()["message"] == "task 'churn' is already served; use PUT /admin/v1/heads/churn to swap it"


def test_add_unknown_head_version_returns_404(apps: Apps) -> None:
    r = apps.admin.post("/admin/v1/heads", json={"task": "brand_new", "version": "v1"}, headers=AUTH)
    assert r.status_code == 404
    assert r.json()["message"] == "task 'brand_new' has no head version 'v1' in tiny/v1"


def test_add_task_whose_output_key_is_taken_returns_409(apps: Apps) -> None:
    # A regression head named `churn_probability` would overwrite the churn head's output key.
    store = ModelStore(apps.runtime.settings.model_store)
    model = store.load("tiny")
    head = model.heads["ltv"].build(model.config.hidden)
    head.spec = type(head.spec)("churn_probability", "regression", (), head.spec.hidden)
    version = store.save_head("tiny", "v1", head, trained_on=model.encoder_hash, metrics={})
    r = apps.admin.post("/admin/v1/heads", json={"task": "churn_probability", "version": version}, headers=AUTH)
    assert r.status_code == 409
    assert "output key 'churn_probability' is already used" in r.json()["message"]


def test_delete_unserved_task_returns_404(apps: Apps) -> None:
    r = apps.admin.delete("/admin/v1/heads/nosuchtask", headers=AUTH)
    assert r.status_code == 404
    assert r.json()["message"] == "task 'nosuchtask' is not served"


def test_delete_last_head_returns_409(apps: Apps) -> None:
    assert apps.admin.delete("/admin/v1/heads/ltv", headers=AUTH).status_code == 200
    assert apps.admin.delete("/admin/v1/heads/segment", headers=AUTH).status_code == 200
    r = apps.admin.delete("/admin/v1/heads/churn", headers=AUTH)
    assert r.status_code == 409
    assert r.json()["message"] == "task 'churn' is the last head; a model needs at least one"
    assert set(apps.model()["heads"]) == {"churn"}


@pytest.mark.parametrize("task", ["churn", "ltv", "segment"])
def test_swap_to_own_version_reports_zero_drift(apps: Apps, task: str) -> None:
    r = apps.admin.put(f"/admin/v1/heads/{task}", json={"version": "v1"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["drift"]["max_abs"] == 0.0


def test_swap_to_the_served_version_is_a_no_op(apps: Apps) -> None:
    r = apps.admin.put("/admin/v1/heads/churn", json={"version": "v1"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["action"] == "unchanged" and r.json()["old"] == r.json()["new"]
    assert apps.model()["heads"]["churn"]["previous"] == []  # nothing to roll back to
