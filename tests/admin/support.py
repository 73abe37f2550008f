"""Helpers of the admin tests: an admin client on the public app's event loop, head versions with known
outputs, and small request wrappers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as st_save

from service.api.admin import create_admin_app
from service.config import Settings
from service.model.heads import HeadSpec, TaskHead
from service.runtime.predictor import Runtime
from service.store.store import ModelStore

TOKEN = "admin-token-for-tests-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
OCTET = {**AUTH, "content-type": "application/octet-stream"}
#: Output-bias shifts of the churn head versions the fixtures store: v2 pushes probabilities up, v3 down.
CHURN_SHIFTS = {"v2": 3.0, "v3": -3.0}


@dataclass
class Apps:
    """A public app and an admin app over one runtime, as `onepass serve` runs them."""

    public: TestClient
    admin: TestClient
    runtime: Runtime

    def predict(self, ids: list[int]) -> dict[str, Any]:
        r = self.public.post("/v1/predict", json={"customer_ids": ids})
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def model(self) -> dict[str, Any]:
        r = self.admin.get("/admin/v1/model", headers=AUTH)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def drain(self) -> None:
        """Wait for the embedding cache's background Redis writes."""
        assert self.runtime.served is not None and self.public.portal is not None
        self.public.portal.call(self.runtime.served.cache.drain)


def admin_client(public: TestClient, settings: Settings, token: str = TOKEN) -> TestClient:
    """The admin app over ``public``'s runtime, sharing its event loop.

    In `onepass serve` both listeners run on one loop; the runtime's Redis pool, batcher and head lock
    belong to it. A second ``with TestClient`` would start a second loop, so the admin client borrows
    the public client's portal instead (its own lifespan does nothing: it does not own the runtime).
    """
    runtime: Runtime = public.app.state.runtime  # type: ignore[attr-defined]
    admin = TestClient(create_admin_app(settings, runtime, token))
    admin.portal = public.portal
    return admin


def shifted_head(store: ModelStore, name: str, task: str, shift: float) -> TaskHead:
    """The model's own ``task`` head with its output bias moved by ``shift`` (clearly different outputs)."""
    model = store.load(name)
    head = model.heads[task].build(model.config.hidden)
    last = [m for m in head.net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias.add_(shift)
    return head


def store_shifted_head(store: ModelStore, name: str, task: str, shift: float) -> str:
    """Save a shifted copy of ``task``'s head as a new head version; returns the version."""
    model = store.load(name)
    head = shifted_head(store, name, task, shift)
    return store.save_head(name, model.version, head, trained_on=model.encoder_hash, metrics={})


def head_bytes(head: TaskHead, **replace: torch.Tensor) -> bytes:
    """A head as safetensors bytes, with some tensors replaced (bad shapes, NaN, ...)."""
    state = {k: v.detach().clone().contiguous() for k, v in head.state_dict().items()}
    state.update(replace)
    return st_save(state)


def head_state(head: TaskHead) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def spec_of(runtime: Runtime, task: str) -> HeadSpec:
    assert runtime.heads is not None
    return runtime.heads.heads[task].spec


def churn(body: dict[str, Any]) -> list[float]:
    return [p["churn_probability"] for p in body["predictions"]]
