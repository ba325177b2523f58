"""mlmesh's Python SDK: typed clients over the generated gRPC stubs, through the gateway.

``Client`` for plain Python, ``AsyncClient`` for asyncio; failures are ``MeshError`` and its
subclasses, one per gRPC status code a caller handles.
"""

from mlmesh_client.aio import AsyncClient
from mlmesh_client.client import Client
from mlmesh_client.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from mlmesh_client.images import ImageError, read_image_file
from mlmesh_client.retry import RetryPolicy

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "ImageError",
    "Internal",
    "InvalidArgument",
    "MeshError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "Unauthenticated",
    "Unavailable",
    "read_image_file",
]
