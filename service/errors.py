"""Domain errors. Each docstring names the HTTP status it maps to; ``service.api.errors`` maps them in
one place. Library code raises these and never imports HTTP types."""

from __future__ import annotations


class OnepassError(Exception):
    """Base class. HTTP 500 when nothing more specific applies."""

    status_code = 500
    code = "internal_error"


class InvalidInputError(OnepassError):
    """The request is malformed or violates a limit. HTTP 422."""

    status_code = 422
    code = "invalid_input"


class NotFoundError(OnepassError):
    """A referenced model, version, head or task does not exist. HTTP 404."""

    status_code = 404
    code = "not_found"


class UnknownIdsError(NotFoundError):
    """Customer ids not present in the served graph. HTTP 404, body lists the ids."""

    code = "unknown_ids"

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        shown = ", ".join(map(str, ids[:20])) + (" ..." if len(ids) > 20 else "")
        super().__init__(f"unknown customer_ids: {shown} ({len(ids)} unknown)")


class ModelStoreError(OnepassError):
    """A stored or uploaded model artefact is invalid (hash, shape, dtype, non-finite). HTTP 422."""

    status_code = 422
    code = "invalid_model_artifact"


class ConflictError(OnepassError):
    """The operation conflicts with the current state (e.g. adding a head that exists). HTTP 409."""

    status_code = 409
    code = "conflict"


class PayloadTooLargeError(OnepassError):
    """An upload exceeds the configured size limit. HTTP 413."""

    status_code = 413
    code = "payload_too_large"


class NotReadyError(OnepassError):
    """The model is not loaded and warmed yet. HTTP 503."""

    status_code = 503
    code = "not_ready"
