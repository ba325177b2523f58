"""mlmesh's Python SDK: a typed client over the generated gRPC stubs, through the gateway."""

from mlmesh_client.client import Client, MeshError
from mlmesh_client.images import ImageError, read_image_file

__all__ = ["Client", "ImageError", "MeshError", "read_image_file"]
