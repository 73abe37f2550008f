"""Point 1: every admin action writes exactly one structured audit line, and no line holds the token."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.store.store import ModelStore
from tests.admin.support import AUTH, OCTET, TOKEN, Apps

AUDIT = "onepass.audit"


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == AUDIT]


def test_every_admin_action_writes_one_audit_line(apps: Apps, caplog: pytest.LogCaptureFixture) -> None:
    store = ModelStore(apps.runtime.settings.model_store)
    v1 = store.load_head("tiny", "v1", "churn", "v1")
    v2 = store.load_head("tiny", "v1", "churn", "v2")
    caplog.set_level("INFO", logger=AUDIT)

    assert apps.admin.put("/admin/v1/heads/churn", json={"version": "v2"}, headers=AUTH).status_code == 200
    assert apps.admin.post("/admin/v1/heads/churn/rollback", headers=AUTH).status_code == 200
    assert apps.admin.delete("/admin/v1/heads/ltv", headers=AUTH).status_code == 200
    assert apps.admin.put("/admin/v1/heads/churn", content=b"junk", headers=OCTET).status_code == 422
    assert apps.admin.put("/admin/v1/heads/churn", json={"version": "v9"}, headers=AUTH).status_code == 404

    ref1 = {"version": "v1", "sha256": v1.sha256}
    ref2 = {"version": "v2", "sha256": v2.sha256}
    lines = audit_lines(caplog)
    assert [(a["action"], a["task"]) for a in lines] == [
        ("swap", "churn"), ("rollback", "churn"), ("remove", "ltv"), ("swap", "churn"), ("swap", "churn"),
    ]  # fmt: skip
    swap, rollback, remove, junk, missing = lines
    assert swap["event"] == "admin"
    assert (swap["old"], swap["new"], swap["result"]) == (ref1, ref2, "ok")
    assert (rollback["old"], rollback["new"], rollback["result"]) == (ref2, ref1, "ok")
    assert remove["old"]["version"] == "v1" and remove["new"] is None and remove["result"] == "ok"
    assert junk["old"] == ref1
    assert junk["new"]["version"] == "upload" and len(junk["new"]["sha256"]) == 64
    assert junk["result"].startswith("rejected: invalid_model_artifact: head 'churn' version upload: not a valid")
    assert missing["old"] == ref1 and missing["new"] == {"version": "v9"}
    assert missing["result"] == "rejected: not_found: task 'churn' has no head version 'v9' in tiny/v1"
    assert TOKEN not in caplog.text


def test_refused_token_is_audited_without_the_token(apps: Apps, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")  # every logger: neither token may appear anywhere
    guess = "guessed-token-abcdefghijklmnop"
    r = apps.admin.put("/admin/v1/heads/churn", json={"version": "v2"}, headers={"authorization": f"Bearer {guess}"})
    assert r.status_code == 401
    assert apps.admin.get("/admin/v1/model", headers=AUTH).status_code == 200
    (line,) = audit_lines(caplog)
    assert line == {
        "event": "admin", "action": "auth", "task": None, "old": None, "new": None,
        "result": "rejected: unauthorized", "method": "PUT", "path": "/admin/v1/heads/churn",
    }  # fmt: skip
    assert guess not in caplog.text
    assert TOKEN not in caplog.text


def test_add_is_audited_with_new_head(apps: Apps, caplog: pytest.LogCaptureFixture) -> None:
    store = ModelStore(apps.runtime.settings.model_store)
    model = store.load("tiny")
    head = model.heads["churn"].build(model.config.hidden)
    head.spec = type(head.spec)("churn_copy", "binary", (), head.spec.hidden)
    version = store.save_head("tiny", "v1", head, trained_on=model.encoder_hash, metrics={})
    caplog.set_level("INFO", logger=AUDIT)
    r = apps.admin.post("/admin/v1/heads", json={"task": "churn_copy", "version": version}, headers=AUTH)
    assert r.status_code == 201, r.text
    (line,) = audit_lines(caplog)
    stored = store.load_head("tiny", "v1", "churn_copy", version)
    assert line["action"] == "add" and line["task"] == "churn_copy"
    assert line["old"] is None
    assert line["new"] == {"version": version, "sha256": stored.sha256}
    assert line["result"] == "ok"


def test_audit_counts_in_metrics(apps: Apps) -> None:
    assert apps.admin.put("/admin/v1/heads/churn", json={"version": "v2"}, headers=AUTH).status_code == 200
    assert apps.admin.put("/admin/v1/heads/churn", json={"version": "v9"}, headers=AUTH).status_code == 404
    text = apps.public.get("/metrics").text
    assert 'onepass_head_swaps_total{action="swap",result="ok"} 1.0' in text
    assert 'onepass_head_swaps_total{action="swap",result="rejected"} 1.0' in text
