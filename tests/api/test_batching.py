"""Concurrent requests through the real app on its own event loop: coalescing into shared encoder passes,
single-flight for the same id, and `batching=False`.

The requests go through httpx's ASGI transport on the loop that runs the app (the TestClient's portal),
so they really are concurrent: the lifespan has run there, and the batcher and Redis pool live there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch
from fastapi.testclient import TestClient

from service.graph.sampler import sample as sample_subgraph
from tests.api.support import (
    assert_same_predictions,
    encoder_passes,
    on_app_loop,
    predict,
    sample,
    scrape,
    served_of,
)
from tests.helpers import make_settings


def post_concurrently(client: TestClient, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """POST every body to /v1/predict at once; responses in the order of ``bodies``."""

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://onepass") as http:
            return list(await asyncio.gather(*(http.post("/v1/predict", json=b) for b in bodies)))

    return on_app_loop(client, burst)


def test_concurrent_requests_within_max_wait_share_one_encoder_pass(
    model_store: Path, redis_url: str, client_factory: Callable[..., TestClient]
) -> None:
    # 300 ms: far longer than 8 requests take to arrive, even on a loaded CI machine.
    client = client_factory(make_settings(model_store, redis_url, batch_max_wait_ms=300))
    ids = list(range(1, 9))

    responses = post_concurrently(client, [{"customer_ids": [i]} for i in ids])

    assert [r.status_code for r in responses] == [200] * len(ids)
    assert [r.json()["predictions"][0]["customer_id"] for r in responses] == ids
    assert all(r.json()["cache"] == {"hits": 0, "misses": 1} for r in responses)
    assert encoder_passes(client) == 1
    m = scrape(client)
    assert sample(m, "onepass_encoder_batch_size_count") == 1
    assert sample(m, "onepass_encoder_batch_size_sum") == len(ids)
    assert sample(m, "onepass_queue_wait_seconds_count") == len(ids)  # one observation per submission


def test_batch_max_size_caps_a_coalesced_pass_without_splitting_a_request(
    model_store: Path, redis_url: str, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory(make_settings(model_store, redis_url, batch_max_wait_ms=300, batch_max_size=4))
    bodies = [{"customer_ids": [1, 2, 3]}, {"customer_ids": [4, 5]}, {"customer_ids": [6, 7, 8, 9, 10, 11]}]

    responses = post_concurrently(client, bodies)

    assert [r.status_code for r in responses] == [200, 200, 200]
    m = scrape(client)
    # 3 + 2 > 4, so each request gets its own pass; the 6-id request exceeds the cap but is not split.
    assert encoder_passes(client) == 3
    assert sample(m, "onepass_encoder_batch_size_count") == 3
    assert sample(m, "onepass_encoder_batch_size_sum") == 11
    assert sample(m, "onepass_encoder_batch_size_bucket", le="4.0") == 2
    assert sample(m, "onepass_encoder_batch_size_bucket", le="8.0") == 3


def test_concurrent_requests_for_the_same_uncached_id_encode_it_once(
    model_store: Path, redis_url: str, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory(make_settings(model_store, redis_url, batch_max_wait_ms=50))

    responses = post_concurrently(client, [{"customer_ids": [42]}] * 6)

    assert [r.status_code for r in responses] == [200] * 6
    first = responses[0].json()["predictions"]
    assert all(r.json()["predictions"] == first for r in responses)
    assert encoder_passes(client) == 1
    m = scrape(client)
    assert sample(m, "onepass_encoder_batch_size_sum") == 1  # the one pass encoded one customer


def test_batching_off_runs_one_pass_per_request(
    model_store: Path, redis_url: str, client_factory: Callable[..., TestClient]
) -> None:
    client = client_factory(make_settings(model_store, redis_url, batching=False, batch_max_wait_ms=300))
    ids = list(range(20, 26))

    responses = post_concurrently(client, [{"customer_ids": [i]} for i in ids])

    assert [r.status_code for r in responses] == [200] * len(ids)
    assert encoder_passes(client) == len(ids)
    m = scrape(client)
    assert sample(m, "onepass_encoder_batch_size_count") == len(ids)
    assert sample(m, "onepass_encoder_batch_size_sum") == len(ids)


def cold_start_ids(client: TestClient, ids: list[int]) -> list[int]:
    """The ids among ``ids`` of customers with no transactions (a sampled subgraph of the seed alone)."""
    served = served_of(client)
    graph = served.graph
    rows = graph.lookup(graph.spec.seed_type, torch.tensor(ids))
    return [
        i
        for i, row in zip(ids, rows.tolist(), strict=True)
        if sum(sample_subgraph(graph, torch.tensor([row]), graph.max_time, served.model.config.fanouts)
               .num_sampled_nodes["transactions"]) == 0
    ]  # fmt: skip


def test_coalesced_answers_equal_the_answers_of_solo_requests(
    model_store: Path, redis_url: str, client_factory: Callable[..., TestClient]
) -> None:
    ids = list(range(1, 13))
    batched = client_factory(make_settings(model_store, redis_url, batch_max_wait_ms=300))
    assert cold_start_ids(batched, ids), "the spec needs a customer without transactions among the ids"
    together = post_concurrently(batched, [{"customer_ids": [i]} for i in ids])
    assert encoder_passes(batched) == 1
    solo_client = client_factory(make_settings(model_store, None, batching=False))

    solo = [predict(solo_client, [i])["predictions"][0] for i in ids]

    assert encoder_passes(solo_client) == len(ids)
    assert_same_predictions([r.json()["predictions"][0] for r in together], solo)
