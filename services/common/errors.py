"""Domain errors. Domain code raises these; the error interceptor maps them to gRPC codes."""

from __future__ import annotations

import grpc


class MeshError(Exception):
    """An error with a message fit for the caller and the gRPC code it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(MeshError):
    """The request is malformed or out of range; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MeshError):
    """The thing the request names does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MeshError):
    """The thing the request would create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MeshError):
    """The system is not in a state the request needs; the message says how to get there."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Internal(MeshError):
    """Something failed that the caller should hear of in words (a served model's own code
    raised): the message says what, the status is INTERNAL."""

    code = grpc.StatusCode.INTERNAL


class Unavailable(MeshError):
    """A dependency (MLflow, PostgreSQL, Redis) cannot be reached; retrying may help."""

    code = grpc.StatusCode.UNAVAILABLE


def check_page_size(page_size: int, *, default: int = 100, maximum: int = 1000) -> int:
    """Validate a request's page_size and resolve 0 to the default."""
    if page_size < 0 or page_size > maximum:
        raise InvalidArgument(f"page_size must be between 0 and {maximum}, got {page_size}")
    return page_size or default
