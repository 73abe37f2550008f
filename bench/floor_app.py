"""The bare-FastAPI floor: same route, same request validation, same JSON shape, no model and no cache.

Served by the same uvicorn settings as onepass (uvloop, httptools, no access log) so the difference
between this and the cache-hit path is exactly onepass's own work.
"""

from __future__ import annotations

import orjson
from fastapi import FastAPI
from fastapi.responses import Response

from service.api.schemas import PredictRequest

CLASSES = ("bargain_hunter", "fashionista", "home_maker", "occasional", "tech_enthusiast")
PROBS = dict.fromkeys(CLASSES, 0.2)
MODEL = {"name": "bench", "version": "v1", "encoder_hash": "0" * 16, "graph_snapshot": "0" * 16,
         "heads": {"churn": "v1", "ltv": "v1", "segment": "v1"}}  # fmt: skip

app = FastAPI()


@app.post("/v1/predict")
async def predict(body: PredictRequest) -> Response:
    preds = [
        {"customer_id": i, "churn_probability": 0.5, "ltv": 12.5,
         "segment": {"label": CLASSES[0], "probabilities": PROBS}}
        for i in body.customer_ids
    ]  # fmt: skip
    n = len(set(body.customer_ids))
    return Response(
        orjson.dumps({"model": MODEL, "cache": {"hits": n, "misses": 0}, "predictions": preds}),
        media_type="application/json",
    )
