"""mlmesh's Python SDK: a typed client over the generated gRPC stubs, through the gateway."""

from mlmesh_client.client import Client, MeshError

__all__ = ["Client", "MeshError"]
