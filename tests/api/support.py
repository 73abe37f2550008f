"""Helpers for the API tests: reaching the runtime of a TestClient's app, running coroutines on the
app's own event loop, reading /metrics with Prometheus' own parser, comparing prediction bodies."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.runtime.predictor import Runtime, Served

T = TypeVar("T")


def runtime_of(client: TestClient) -> Runtime:
    rt: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    return rt


def served_of(client: TestClient) -> Served:
    served = runtime_of(client).served
    assert served is not None, "the runtime has no loaded model"
    return served


def on_app_loop(client: TestClient, fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()`` on the event loop that serves the app (the batcher and Redis pool live there)."""
    assert client.portal is not None, "use the client inside its `with` block"
    return client.portal.call(fn)


def drain_writes(client: TestClient) -> None:
    """Wait for the background Redis writes of the embedding cache."""
    on_app_loop(client, served_of(client).cache.drain)


def encoder_passes(client: TestClient) -> int:
    return served_of(client).batcher.passes


def predict(client: TestClient, ids: list[int]) -> dict[str, Any]:
    r = client.post("/v1/predict", json={"customer_ids": ids})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def scrape(client: TestClient) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """/metrics as ``family name -> [(sample name, labels, value)]``, parsed by prometheus_client."""
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    return {
        fam.name: [(s.name, dict(s.labels), s.value) for s in fam.samples]
        for fam in text_string_to_metric_families(r.text)
    }


def sample(families: dict[str, list[tuple[str, dict[str, str], float]]], name: str, **labels: str) -> float:
    """The value of the one sample called ``name`` whose labels include ``labels``."""
    family = name
    for suffix in ("_total", "_bucket", "_count", "_sum", "_created"):
        if name.endswith(suffix) and name[: -len(suffix)] in families:
            family = name[: -len(suffix)]
    hits = [
        v for n, lab, v in families.get(family, []) if n == name and all(lab.get(k) == x for k, x in labels.items())
    ]
    assert len(hits) == 1, f"expected one sample {name}{labels}, found {len(hits)}"
    return hits[0]


def flatten(prediction: dict[str, Any]) -> dict[str, object]:
    """One prediction as ``path -> leaf`` (`segment.probabilities.fashionista` -> 0.12)."""
    out: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", prediction)
    return out


def assert_same_predictions(got: list[dict[str, Any]], want: list[dict[str, Any]], tol: float = 1e-5) -> None:
    """Same ids in the same order, same labels, every number within ``tol`` (absolute or relative)."""
    assert [p["customer_id"] for p in got] == [p["customer_id"] for p in want]
    for g, w in zip(got, want, strict=True):
        gf, wf = flatten(g), flatten(w)
        assert gf.keys() == wf.keys()
        for key, want_value in wf.items():
            got_value = gf[key]
            if isinstance(want_value, float):
                assert isinstance(got_value, float)
                assert math.isclose(got_value, want_value, rel_tol=tol, abs_tol=tol), (g["customer_id"], key)
            else:
                assert got_value == want_value, (g["customer_id"], key)
