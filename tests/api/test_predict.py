"""POST /v1/predict: answers, the embedding cache behind them, encoder passes, and error bodies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from tests.api.support import (
    assert_same_predictions,
    drain_writes,
    encoder_passes,
    predict,
    served_of,
)
from tests.helpers import make_settings


def test_predict_returns_every_head_for_each_id_in_order(client: TestClient) -> None:
    body = predict(client, [3, 1, 2])

    assert body["model"]["name"] == "tiny"
    assert body["model"]["version"] == "v1"
    assert set(body["model"]["heads"]) == {"churn", "ltv", "segment"}
    assert body["cache"] == {"hits": 0, "misses": 3}
    assert [p["customer_id"] for p in body["predictions"]] == [3, 1, 2]
    for p in body["predictions"]:
        assert 0.0 <= p["churn_probability"] <= 1.0
        assert p["ltv"] >= 0.0
        probs = p["segment"]["probabilities"]
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert p["segment"]["label"] == max(probs, key=probs.__getitem__)


def test_predict_cache_hit_equals_miss_from_local_lru_and_from_redis(client: TestClient) -> None:
    ids = list(range(1, 11))
    miss = predict(client, ids)
    drain_writes(client)
    passes = encoder_passes(client)

    from_lru = predict(client, ids)
    served_of(client).cache.local.clear()  # the next hits must come from Redis MGET
    from_redis = predict(client, ids)

    assert miss["cache"] == {"hits": 0, "misses": 10}
    assert from_lru["cache"] == {"hits": 10, "misses": 0}
    assert from_redis["cache"] == {"hits": 10, "misses": 0}
    assert encoder_passes(client) == passes
    assert_same_predictions(from_lru["predictions"], miss["predictions"])
    assert_same_predictions(from_redis["predictions"], miss["predictions"])


def test_predict_writes_namespaced_float32_keys_with_ttl(
    model_store: Path, redis_url: str, redis_client: redis.Redis, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory(make_settings(model_store, redis_url, cache_ttl_s=3600))
    body = predict(client, [5, 7, 9])
    drain_writes(client)

    served = served_of(client)
    model = body["model"]
    prefix = f"onepass:emb:{model['encoder_hash']}:{model['graph_snapshot']}:"
    assert served.namespace == f"{model['encoder_hash']}:{model['graph_snapshot']}"
    assert sorted(redis_client.keys("onepass:emb:*")) == sorted(f"{prefix}{i}".encode() for i in (5, 7, 9))
    hidden = served.model.config.hidden
    for i in (5, 7, 9):
        raw = redis_client.get(f"{prefix}{i}")
        assert isinstance(raw, bytes) and len(raw) == hidden * 4
        stored = np.frombuffer(raw, dtype="<f4")
        local = served.cache.local.get(i)
        assert local is not None
        np.testing.assert_array_equal(stored, local)
        assert 3500 < redis_client.ttl(f"{prefix}{i}") <= 3600


def test_predict_runs_exactly_one_encoder_pass_per_request(client: TestClient, known_ids: list[int]) -> None:
    ids = known_ids[:50]
    before = encoder_passes(client)

    first = predict(client, ids)
    after_miss = encoder_passes(client)
    drain_writes(client)
    second = predict(client, ids)

    assert first["cache"] == {"hits": 0, "misses": 50}
    assert after_miss - before == 1
    assert second["cache"] == {"hits": 50, "misses": 0}
    assert encoder_passes(client) == after_miss


def test_predict_partly_cached_request_encodes_only_the_misses_in_one_pass(client: TestClient) -> None:
    predict(client, [1, 2, 3])
    before = encoder_passes(client)

    body = predict(client, [1, 2, 3, 4, 5])

    assert body["cache"] == {"hits": 3, "misses": 2}
    assert encoder_passes(client) - before == 1


def test_predict_duplicates_are_answered_in_order_and_encoded_once(client: TestClient) -> None:
    body = predict(client, [4, 2, 4, 4, 2])

    assert [p["customer_id"] for p in body["predictions"]] == [4, 2, 4, 4, 2]
    assert body["cache"] == {"hits": 0, "misses": 2}
    p = body["predictions"]
    assert p[0] == p[2] == p[3]
    assert p[1] == p[4]


def test_predict_unknown_ids_is_404_listing_them(client: TestClient) -> None:
    before = encoder_passes(client)

    r = client.post("/v1/predict", json={"customer_ids": [1, 999_999, 2, 888_888, 999_999]})

    assert r.status_code == 404
    body = r.json()
    assert body["error"] == "unknown_ids"
    assert "999999" in body["message"] and "888888" in body["message"]
    assert body["details"] == {"unknown_ids": [888_888, 999_999]}
    assert encoder_passes(client) == before  # nothing is computed for a request that fails


@pytest.mark.parametrize(
    ("payload", "field", "phrase"),
    [
        ({"customer_ids": []}, "customer_ids", "at least 1 item"),
        ({}, "customer_ids", "Field required"),
        ({"customer_ids": ["abc"]}, "customer_ids[0]", "valid integer"),
        ({"customer_ids": [1, "5"]}, "customer_ids[1]", "valid integer"),
        ({"customer_ids": [True]}, "customer_ids[0]", "valid integer"),
        ({"customer_ids": [2.0]}, "customer_ids[0]", "valid integer"),
        ({"customer_ids": [1, -3]}, "customer_ids[1]", "greater than or equal to 0"),
        ({"customer_ids": [2**63]}, "customer_ids[0]", "less than or equal to"),
        ({"customer_ids": "1,2,3"}, "customer_ids", "valid list"),
        ({"customer_ids": [1], "limit": 5}, "limit", "Extra inputs are not permitted"),
    ],
    ids=["empty", "missing", "string", "numeric-string", "bool", "float", "negative", "too-big", "not-a-list",
         "extra-field"],
)  # fmt: skip
def test_predict_invalid_body_is_422_naming_the_field(
    client: TestClient, payload: dict[str, object], field: str, phrase: str
) -> None:
    r = client.post("/v1/predict", json=payload)

    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "invalid_input"
    assert body["message"].startswith(f"{field}: ")
    assert phrase in body["message"]
    assert body["details"][0]["field"] == field
    assert phrase in body["details"][0]["message"]


def test_predict_malformed_json_is_422_with_error_body(client: TestClient) -> None:
    r = client.post("/v1/predict", content=b'{"customer_ids": [1, 2', headers={"content-type": "application/json"})

    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "invalid_input"
    assert body["message"] == "body: JSON decode error at character 22"
    assert body["details"] == [{"field": "body", "message": "JSON decode error at character 22"}]


def test_predict_body_that_is_not_an_object_is_422(client: TestClient) -> None:
    r = client.post("/v1/predict", json=[1, 2, 3])

    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "invalid_input"
    assert body["details"][0]["field"] == "body"
    assert "valid dictionary" in body["message"]


def test_predict_more_ids_than_the_limit_is_422_naming_customer_ids(
    model_store: Path, redis_url: str, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory(make_settings(model_store, redis_url, max_ids_per_request=5))

    ok = client.post("/v1/predict", json={"customer_ids": [1, 2, 3, 4, 5]})
    r = client.post("/v1/predict", json={"customer_ids": [1, 2, 3, 4, 5, 6]})

    assert ok.status_code == 200
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "invalid_input"
    assert body["message"] == "customer_ids: 6 ids, at most 5 per request"


def test_predict_wrong_method_and_unknown_route_use_the_error_body(client: TestClient) -> None:
    wrong_method = client.get("/v1/predict")
    missing = client.get("/v1/nothing-here")

    assert wrong_method.status_code == 405
    assert wrong_method.json() == {"error": "http_error", "message": "Method Not Allowed", "details": None}
    assert missing.status_code == 404
    assert missing.json() == {"error": "http_error", "message": "Not Found", "details": None}


def test_predict_with_float16_cache_hits_within_half_precision(
    model_store: Path, redis_url: str, redis_client: redis.Redis, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory(make_settings(model_store, redis_url, cache_dtype="float16"))
    ids = [11, 12, 13]
    miss = predict(client, ids)
    drain_writes(client)
    served_of(client).cache.local.clear()

    hit = predict(client, ids)

    assert hit["cache"] == {"hits": 3, "misses": 0}
    key = redis_client.keys("onepass:emb:*")[0]
    assert len(redis_client.get(key) or b"") == served_of(client).model.config.hidden * 2
    assert_same_predictions(hit["predictions"], miss["predictions"], tol=1e-2)


def test_predict_with_a_non_json_content_type_returns_415(client: TestClient) -> None:
    r = client.post("/v1/predict", content=b"customer_ids=1", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert r.json() == {
        "error": "unsupported_media_type",
        "message": "content-type: text/plain; send application/json",
        "details": None,
    }


def test_method_not_allowed_keeps_the_allow_header(client: TestClient) -> None:
    r = client.get("/v1/predict")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"


def test_predict_body_over_the_size_limit_returns_413(
    model_store: Path, redis_url: str, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory(make_settings(model_store, redis_url, max_body_bytes=2048))
    body = b'{"customer_ids": [' + b",".join([b"123456789"] * 400) + b"]}"
    r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json() == {
        "error": "payload_too_large",
        "message": f"body: {len(body)} bytes, the limit is 2048 bytes",
        "details": None,
    }
    assert client.post("/v1/predict", json={"customer_ids": [1]}).status_code == 200
