"""Request and response bodies of the public API."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# strict: a JSON integer only. Lax mode would answer `true` as customer 1 and "5" or 5.0 as customer 5.
CustomerId = Annotated[int, Field(ge=0, le=2**63 - 1, strict=True)]


class PredictRequest(BaseModel):
    """Customers to score. Duplicates are allowed and answered in order."""

    model_config = ConfigDict(extra="forbid")
    # The upper bound is the server's `max_ids_per_request` (checked by the runtime, 422 naming the field).
    customer_ids: list[CustomerId] = Field(..., min_length=1, examples=[[1, 2, 3]])


class SegmentOutput(BaseModel):
    label: str
    probabilities: dict[str, float]


class ModelInfo(BaseModel):
    name: str
    version: str
    encoder_hash: str
    graph_snapshot: str
    heads: dict[str, str] = Field(description="task -> head version")


class CacheInfo(BaseModel):
    hits: int
    misses: int


class PredictResponse(BaseModel):
    """One entry per requested id. Keys per head: `<task>_probability` (binary), `<task>` in dollars
    (regression), `<task>: {label, probabilities}` (multi-class) — a head added at run time appears
    here without code changes."""

    model: ModelInfo
    cache: CacheInfo
    predictions: list[dict[str, object]]


class ErrorBody(BaseModel):
    """Every error response has this shape."""

    error: str = Field(description="machine-readable code")
    message: str
    details: object | None = None


class ReadyBody(BaseModel):
    ready: bool
    state: str
    reason: str
    degraded: bool | None
    redis: str
    startup_s: float | None
