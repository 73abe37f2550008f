"""Probes and documentation: /healthz, /readyz through the load state machine, /metrics parsed with
Prometheus' own parser, /docs and /openapi.json."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.runtime.predictor import Runtime
from service.store.store import LoadedModel, ModelStore
from tests.api.support import drain_writes, predict, runtime_of, sample, scrape
from tests.helpers import make_settings


class GatedStore(ModelStore):
    """The real model store, whose `load` waits until the test opens the gate: the load is then
    observably in progress, with no sleeps and no race."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def load(self, name: str, version: str | None = None) -> LoadedModel:
        self.entered.set()
        if not self.gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        return super().load(name, version)


class GatedRuntime(Runtime):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.store: GatedStore = GatedStore(settings.model_store)


def test_readyz_is_503_with_the_reason_until_the_model_is_loaded_and_warmed(settings: Settings) -> None:
    runtime = GatedRuntime(settings)
    # The app does not own a runtime passed in: the test starts and closes it, as `onepass serve` does.
    with TestClient(create_app(settings, runtime)) as client:
        assert client.portal is not None
        client.portal.call(runtime.start)  # returns at once; the load runs in a worker thread
        try:
            try:
                assert runtime.store.entered.wait(10)
                loading = client.get("/readyz")
                live = client.get("/healthz")
                early = client.post("/v1/predict", json={"customer_ids": [1]})
                early_metrics = scrape(client)
            finally:
                runtime.store.gate.set()
            client.portal.call(runtime.wait_ready)
            ready = client.get("/readyz")
            answer = client.post("/v1/predict", json={"customer_ids": [1]})
        finally:
            client.portal.call(runtime.close)

    assert loading.status_code == 503
    assert loading.json() == {
        "ready": False,
        "state": "starting",
        "reason": "loading model from the model store",
        "degraded": None,
        "redis": "unknown",
        "startup_s": None,
    }
    assert live.status_code == 200
    assert live.json() == {"status": "ok"}
    assert early.status_code == 503
    assert early.json() == {
        "error": "not_ready",
        "message": "model not ready: loading model from the model store",
        "details": None,
    }
    assert sample(early_metrics, "onepass_ready") == 0
    assert ready.status_code == 200
    body = ready.json()
    assert (body["ready"], body["state"], body["reason"], body["degraded"], body["redis"]) == (
        True, "ready", "ok", False, "ok",
    )  # fmt: skip
    assert body["startup_s"] > 0
    assert answer.status_code == 200


def test_readyz_is_503_failed_with_the_cause_when_the_model_cannot_load(
    model_store: Path, redis_url: str, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory(make_settings(model_store, redis_url, model_name="no-such-model"), wait_ready=False)
    deadline = time.monotonic() + 30
    while runtime_of(client).state != "failed" and time.monotonic() < deadline:
        time.sleep(0.02)

    ready = client.get("/readyz")
    live = client.get("/healthz")
    r = client.post("/v1/predict", json={"customer_ids": [1]})

    assert ready.status_code == 503
    body = ready.json()
    assert (body["ready"], body["state"]) == (False, "failed")
    assert "no-such-model" in body["reason"]
    assert live.status_code == 200
    assert r.status_code == 503
    assert r.json()["error"] == "not_ready"
    assert r.json()["message"].startswith("model not ready: ")
    assert "no-such-model" in r.json()["message"]


def test_healthz_is_200_after_ready(client: TestClient) -> None:
    r = client.get("/healthz")

    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_readyz_without_redis_is_ready_and_degraded(
    model_store: Path, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory(make_settings(model_store, None))

    r = client.get("/readyz")
    answer = predict(client, [1, 2])

    assert r.status_code == 200
    assert (r.json()["ready"], r.json()["degraded"], r.json()["redis"]) == (True, True, "not configured")
    assert answer["cache"] == {"hits": 0, "misses": 2}
    assert predict(client, [1, 2])["cache"] == {"hits": 2, "misses": 0}  # the in-process LRU still serves


def test_metrics_export_every_serving_metric(client: TestClient) -> None:
    first = predict(client, [1, 2, 3])
    drain_writes(client)
    predict(client, [1, 2, 3, 4])
    assert client.post("/v1/predict", json={"customer_ids": [999_999]}).status_code == 404
    assert client.post("/v1/predict", json={"customer_ids": []}).status_code == 422

    m = scrape(client)

    predict_200 = {"route": "/v1/predict", "method": "POST", "status": "200"}
    assert sample(m, "onepass_http_request_duration_seconds_count", **predict_200) == 2
    assert sample(m, "onepass_http_request_duration_seconds_bucket", le="+Inf", **predict_200) == 2
    assert sample(m, "onepass_http_request_duration_seconds_sum", **predict_200) > 0
    for status in ("404", "422"):
        assert sample(m, "onepass_http_requests_total", route="/v1/predict", method="POST", status=status) == 1
    assert sample(m, "onepass_predictions_total") == 7
    assert sample(m, "onepass_cache_lookups_total", result="hit") == 3
    assert sample(m, "onepass_cache_lookups_total", result="miss") == 4
    assert sample(m, "onepass_encoder_passes_total") == 2
    assert sample(m, "onepass_encoder_batch_size_count") == 2
    assert sample(m, "onepass_encoder_batch_size_sum") == 4  # 3 misses, then 1
    assert sample(m, "onepass_encoder_duration_seconds_count") == 2
    assert sample(m, "onepass_sampled_nodes_count") == 2
    assert sample(m, "onepass_sampled_nodes_sum") >= 4  # at least the seeds
    assert sample(m, "onepass_queue_wait_seconds_count") == 2
    for stage in ("cache", "sample", "encode", "heads"):
        assert sample(m, "onepass_stage_duration_seconds_count", stage=stage) >= 2
    model = first["model"]
    assert (
        sample(m, "onepass_model_info", model="tiny", version=model["version"], encoder_hash=model["encoder_hash"],
               snapshot=model["graph_snapshot"])
        == 1
    )  # fmt: skip
    for task, version in model["heads"].items():
        assert sample(m, "onepass_head_info", task=task, version=version) == 1
    assert sample(m, "onepass_redis_breaker_state") == 0
    assert sample(m, "onepass_ready") == 1
    assert sample(m, "process_resident_memory_bytes") > 10 * 2**20


def test_metrics_speak_openmetrics_when_the_scraper_asks(client: TestClient) -> None:
    r = client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})

    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")


def test_docs_points_to_the_openapi_document(client: TestClient) -> None:
    r = client.get("/docs")

    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert 'href="/openapi.json"' in r.text


def test_openapi_describes_predict_and_its_errors(client: TestClient) -> None:
    r = client.get("/openapi.json")

    assert r.status_code == 200
    doc = r.json()
    assert {"/v1/predict", "/healthz", "/readyz", "/metrics"} <= set(doc["paths"])
    assert not any(p.startswith("/admin") for p in doc["paths"])  # the admin API has its own listener
    post = doc["paths"]["/v1/predict"]["post"]
    assert {"200", "404", "422", "503"} <= set(post["responses"])
    assert post["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    ids = doc["components"]["schemas"]["PredictRequest"]["properties"]["customer_ids"]
    assert ids["items"]["type"] == "integer" and ids["minItems"] == 1


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"])
def test_probe_and_doc_routes_answer_get_only(client: TestClient, path: str) -> None:
    r = client.post(path)

    assert r.status_code == 405
    assert r.json() == {"error": "http_error", "message": "Method Not Allowed", "details": None}
