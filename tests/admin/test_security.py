"""Point 6: whatever an admin sends that is not a valid head is refused with a clear 4xx, and the old
head keeps serving bit-identical outputs."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save

from service.model.heads import TaskHead
from service.store.store import ModelStore
from tests.admin.support import AUTH, OCTET, Apps, head_bytes, head_state


def _churn_head(apps: Apps) -> TaskHead:
    store = ModelStore(apps.runtime.settings.model_store)
    model = store.load("tiny")
    return model.heads["churn"].build(model.config.hidden)


def _pickle(head: TaskHead) -> bytes:
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)  # what a `.pt` file holds: a zip of pickles
    return buf.getvalue()


def _plain_pickle(head: TaskHead) -> bytes:
    import pickle

    return pickle.dumps(head_state(head))


def _wrong_shape(head: TaskHead) -> bytes:
    w = head.state_dict()["net.0.weight"]
    return head_bytes(head, **{"net.0.weight": torch.zeros(w.shape[0], w.shape[1] + 1)})


def _wrong_dtype(head: TaskHead) -> bytes:
    return head_bytes(head, **{"net.0.weight": head.state_dict()["net.0.weight"].double()})


def _missing_tensor(head: TaskHead) -> bytes:
    state = head_state(head)
    del state["net.0.bias"]
    return st_save(state)


def _extra_tensor(head: TaskHead) -> bytes:
    return head_bytes(head, backdoor=torch.zeros(3))


def _nan(head: TaskHead) -> bytes:
    b = head.state_dict()["net.2.bias"].clone()
    b[0] = float("nan")
    return head_bytes(head, **{"net.2.bias": b})


def _inf(head: TaskHead) -> bytes:
    w = head.state_dict()["net.0.weight"].clone()
    w[0, 0] = float("inf")
    return head_bytes(head, **{"net.0.weight": w})


def _golden_overflow(head: TaskHead) -> bytes:
    # Finite weights whose outputs are not: +-3e38 columns overflow to inf - inf = NaN on real embeddings.
    w = head.state_dict()["net.0.weight"].clone()
    w[:, 0::2], w[:, 1::2] = 3e38, -3e38
    return head_bytes(head, **{"net.0.weight": w})


BAD_UPLOADS: dict[str, tuple[Callable[[TaskHead], bytes], int, str]] = {
    "torch-save": (_pickle, 422, "only safetensors is accepted"),
    "pickle": (_plain_pickle, 422, "only safetensors is accepted"),
    "garbage": (lambda _: b"\x00\x01 not a head at all", 422, "not a valid safetensors file"),
    "empty": (lambda _: b"", 422, "not a valid safetensors file"),
    "wrong-shape": (_wrong_shape, 422, "tensor 'net.0.weight' is torch.float32"),
    "wrong-dtype": (_wrong_dtype, 422, "tensor 'net.0.weight' is torch.float64"),
    "missing-tensor": (_missing_tensor, 422, "tensor names differ (missing ['net.0.bias']"),
    "extra-tensor": (_extra_tensor, 422, "unexpected ['backdoor']"),
    "nan": (_nan, 422, "tensor 'net.2.bias' has NaN or infinite values"),
    "inf": (_inf, 422, "tensor 'net.0.weight' has NaN or infinite values"),
    "golden-non-finite": (_golden_overflow, 422, "golden check produced non-finite outputs"),
    # Right shapes, but the file says it was trained on another encoder.
    "other-encoder": (
        lambda h: st_save({k: v.contiguous() for k, v in h.state_dict().items()}, {"trained_on": "0123456789abcdef"}),
        422,
        "was trained on encoder 0123456789abcdef",
    ),
}


@pytest.fixture
def baseline(apps: Apps, known_ids: list[int]) -> Iterator[dict[str, Any]]:
    """Predictions and head listing before an attack; after it, both must be unchanged bit for bit."""
    before = apps.predict(known_ids)
    heads = apps.model()["heads"]
    versions = ModelStore(apps.runtime.settings.model_store).head_versions("tiny", "v1", "churn")
    yield before
    assert apps.predict(known_ids)["predictions"] == before["predictions"]
    assert apps.model()["heads"] == heads
    # Nothing refused was written to the model store either.
    assert ModelStore(apps.runtime.settings.model_store).head_versions("tiny", "v1", "churn") == versions


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_refused_and_old_head_serves(apps: Apps, baseline: dict[str, Any], case: str) -> None:
    make, status, message = BAD_UPLOADS[case]
    r = apps.admin.put("/admin/v1/heads/churn", content=make(_churn_head(apps)), headers=OCTET)
    assert r.status_code == status, r.text
    assert r.json()["error"] == "invalid_model_artifact"
    assert message in r.json()["message"]


def test_oversize_upload_returns_413(apps: Apps, baseline: dict[str, Any]) -> None:
    limit = apps.runtime.settings.admin_max_upload_bytes
    r = apps.admin.put("/admin/v1/heads/churn", content=b"\0" * (limit + 1), headers=OCTET)
    assert r.status_code == 413
    assert r.json() == {
        "error": "payload_too_large",
        "message": f"body: {limit + 1} bytes, the limit is {limit} bytes",
        "details": None,
    }


def test_oversize_chunked_upload_returns_413(apps: Apps, baseline: dict[str, Any]) -> None:
    # No content-length: the limit is enforced while the body streams in.
    limit = apps.runtime.settings.admin_max_upload_bytes

    def chunks() -> Iterator[bytes]:
        for _ in range(limit // 65536 + 2):
            yield b"\0" * 65536

    r = apps.admin.put("/admin/v1/heads/churn", content=chunks(), headers=OCTET)
    assert r.status_code == 413
    assert r.json()["message"] == f"body: more than {limit} bytes, the limit is {limit} bytes"


def test_oversize_json_reference_returns_413(apps: Apps, baseline: dict[str, Any]) -> None:
    r = apps.admin.put("/admin/v1/heads/churn", json={"version": "v" * 10_000}, headers=AUTH)
    assert r.status_code == 413


BAD_TASKS = {
    "dot-dot": "..%2F..%2Fetc%2Fpasswd",
    "absolute": "%2Fetc%2Fpasswd",
    "url": "http:%2F%2Fevil.example%2Fhead",
    "dot-dot-name": "%2E%2E",  # a bare ".." would be resolved by the client before sending
    "backslash": "..%5Cwindows",
    "space": "churn%20x",
}


@pytest.mark.parametrize("method", ["PUT", "DELETE", "POST rollback"])
@pytest.mark.parametrize("case", list(BAD_TASKS))
def test_task_path_param_with_path_or_url_returns_422(
    apps: Apps, baseline: dict[str, Any], method: str, case: str
) -> None:
    raw = BAD_TASKS[case]
    if method == "POST rollback":
        r = apps.admin.post(f"/admin/v1/heads/{raw}/rollback", headers=AUTH)
    else:
        r = apps.admin.request(method, f"/admin/v1/heads/{raw}", json={"version": "v2"}, headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_input"
    assert r.json()["message"].startswith("task '")
    assert "is not a valid name (letters, digits, '_', '.', '-')" in r.json()["message"]


BAD_VERSIONS = ["../v2", "/etc/passwd", "http://evil.example/head.safetensors", "file:///etc/passwd", "..", "v2/../v3"]


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_json_version_with_path_or_url_returns_422(apps: Apps, baseline: dict[str, Any], version: str) -> None:
    r = apps.admin.put("/admin/v1/heads/churn", json={"version": version}, headers=AUTH)
    assert r.status_code == 422
    assert r.json() == {
        "error": "invalid_input",
        "message": f"version {version!r} is not a valid name (letters, digits, '_', '.', '-')",
        "details": None,
    }
    r = apps.admin.post("/admin/v1/heads", json={"task": "new_task", "version": version}, headers=AUTH)
    assert r.status_code == 422
    assert "is not a valid name" in r.json()["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"version": "v2", "path": "/tmp/head.safetensors"},  # extra fields are refused, not ignored
        {"url": "http://evil.example/head"},
        {"version": 2},
        [],
    ],
    ids=["extra-path", "url-only", "not-a-string", "not-an-object"],
)
def test_json_reference_other_than_a_version_returns_422(apps: Apps, baseline: dict[str, Any], body: object) -> None:
    r = apps.admin.put("/admin/v1/heads/churn", json=body, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["message"].startswith('body: expected {"version": "<head version>"}')


def test_malformed_json_returns_422(apps: Apps, baseline: dict[str, Any]) -> None:
    r = apps.admin.put("/admin/v1/heads/churn", content=b"{nope", headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["message"].startswith('body: expected {"version": "<head version>"}')


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-python-pickle", "multipart/form-data", None])
def test_unsupported_content_type_returns_415(apps: Apps, baseline: dict[str, Any], ctype: str | None) -> None:
    headers = dict(AUTH) if ctype is None else {**AUTH, "content-type": ctype}
    r = apps.admin.put("/admin/v1/heads/churn", content=head_bytes(_churn_head(apps)), headers=headers)
    assert r.status_code == 415
    assert r.json()["error"] == "unsupported_media_type"
    assert "send application/octet-stream (a safetensors file) or application/json" in r.json()["message"]
