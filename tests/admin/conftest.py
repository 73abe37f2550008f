"""Fixtures of the admin tests: a private copy of the tiny model store (tests here write head versions
into it), and public + admin clients over one runtime."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.store.store import ModelStore
from tests.admin.support import CHURN_SHIFTS, Apps, admin_client, store_shifted_head
from tests.helpers import make_settings


@pytest.fixture(scope="session")
def admin_template(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny store plus churn head versions v2 (+3 on the output bias) and v3 (-3)."""
    root = tmp_path_factory.mktemp("admin_template") / "store"
    shutil.copytree(model_store, root)
    store = ModelStore(root)
    for version, shift in CHURN_SHIFTS.items():
        assert store_shifted_head(store, "tiny", "churn", shift) == version
    return root


@pytest.fixture
def admin_store(admin_template: Path, tmp_path: Path) -> Path:
    """A fresh copy per test (about 100 KB): head versions written by one test never reach another."""
    root = tmp_path / "store"
    shutil.copytree(admin_template, root)
    return root


@pytest.fixture
def admin_settings(admin_store: Path, redis_url: str) -> Settings:
    return make_settings(admin_store, redis_url)


@pytest.fixture
def apps(admin_settings: Settings, client_factory: Callable[..., TestClient]) -> Apps:
    public = client_factory(admin_settings)
    return Apps(public, admin_client(public, admin_settings), public.app.state.runtime)  # type: ignore[attr-defined]


@pytest.fixture
def known_ids(apps: Apps) -> list[int]:
    """Twenty customer ids of the tiny graph, spread over the table."""
    served = apps.runtime.served
    assert served is not None
    ids = served.graph.nodes[served.graph.spec.seed_type].ids
    assert ids is not None
    return ids[:: max(1, len(ids) // 20)][:20].tolist()
