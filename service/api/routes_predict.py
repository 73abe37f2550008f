"""POST /v1/predict."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api.deps import runtime_of
from service.api.schemas import ErrorBody, PredictRequest, PredictResponse

router = APIRouter(tags=["predict"])


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    responses={404: {"model": ErrorBody}, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}},
)
async def predict(body: PredictRequest, request: Request) -> Response:
    """Every head's output for each id: one encoder pass for the cache misses, one JSON response.

    Unknown ids give 404 with the list of unknown ids in `details.unknown_ids`.
    """
    # The hot path reads the runtime straight from app state rather than through `RuntimeDep`: FastAPI's
    # dependency solver was the largest single cost of a cache hit (cProfile, docs/serving.md).
    # The runtime returns the body as bytes: no re-validation or re-encoding of a response it built.
    return Response(await runtime_of(request).predict_json(body.customer_ids), media_type="application/json")
