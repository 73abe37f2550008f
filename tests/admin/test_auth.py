"""Point 1: the admin API exists only with a token, and every route needs it (constant-time check)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.api.admin import create_admin_app
from tests.admin.support import AUTH, TOKEN, Apps
from tests.helpers import make_settings

ROUTES = [
    ("GET", "/admin/v1/model", None),
    ("PUT", "/admin/v1/heads/churn", {"version": "v2"}),
    ("POST", "/admin/v1/heads/churn/rollback", None),
    ("POST", "/admin/v1/heads", {"task": "churn2", "version": "v2"}),
    ("DELETE", "/admin/v1/heads/ltv", None),
]


BAD_HEADERS = [
    {},
    {"authorization": "Bearer wrong-token-0123456789abcdef"},
    {"authorization": f"Bearer {TOKEN[:-1]}"},  # a prefix of the right token
    {"authorization": f"Bearer {TOKEN}x"},  # the right token plus one character
    {"authorization": f"Basic {TOKEN}"},  # right secret, wrong scheme
    {"authorization": TOKEN},  # no scheme at all
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_admin_route_without_valid_token_returns_401(
    apps: Apps, method: str, path: str, body: dict[str, str] | None
) -> None:
    before = apps.model()
    for headers in BAD_HEADERS:
        r = apps.admin.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json() == {
            "error": "unauthorized",
            "message": "missing or invalid admin token (Authorization: Bearer <token>)",
            "details": None,
        }
    assert apps.model()["heads"] == before["heads"]


def test_unauthenticated_body_is_not_parsed(apps: Apps) -> None:
    # A malformed body without a token gets 401, not a 422 that would show the route's schema.
    r = apps.admin.post("/admin/v1/heads", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401


def test_token_is_compared_in_constant_time(apps: Apps, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = secrets.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(secrets, "compare_digest", spy)
    assert apps.admin.get("/admin/v1/model", headers=AUTH).status_code == 200
    assert apps.admin.get("/admin/v1/model", headers={"authorization": "Bearer nope"}).status_code == 401
    assert calls == [(TOKEN.encode(), TOKEN.encode()), (b"nope", TOKEN.encode())]


def test_public_app_has_no_admin_routes(apps: Apps) -> None:
    r = apps.public.get("/admin/v1/model", headers=AUTH)
    assert r.status_code == 404


def test_admin_is_disabled_without_a_token(tmp_path: Path) -> None:
    assert make_settings(tmp_path, None).resolved_admin_token() is None


def test_admin_token_file_enables_admin(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    assert make_settings(tmp_path, None, admin_token_file=token_file).resolved_admin_token() == TOKEN


@pytest.mark.parametrize("weak", ["changeme", "short-token", "password"])
def test_weak_admin_token_is_refused(tmp_path: Path, weak: str) -> None:
    with pytest.raises(ValidationError, match="at least 16 characters"):
        make_settings(tmp_path, None, admin_token=weak)


def test_short_token_file_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("short\n")
    with pytest.raises(ValueError, match="shorter than 16 characters"):
        make_settings(tmp_path, None, admin_token_file=token_file).resolved_admin_token()


def test_admin_port_must_differ_from_public_port(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="admin_port must differ"):
        make_settings(tmp_path, None, port=9000, admin_port=9000)


def test_create_admin_app_refuses_short_token(apps: Apps) -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        create_admin_app(apps.runtime.settings, apps.runtime, "short")
