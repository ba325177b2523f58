"""The header names the gateway and the services share (and the SDK speaks on the wire).

A leaf module: it imports nothing, so the gateway's renderer can take these names without the
service kit's gRPC server, interceptors or Redis behind them.
"""

# Where callers send their API key, over REST and gRPC alike; the gateway's api_key_auth reads it.
API_KEY_HEADER = "x-api-key"
# The client the key belongs to: set by the gateway's api_key_auth filter after it strips any
# copy the caller sent; the services trust it only from a caller with a mesh certificate.
CLIENT_HEADER = "x-mlmesh-client"
# Whole seconds until a rate-limited caller may try again: a trailer over gRPC, a header over
# REST (Envoy copies the trailer; the OIP HTTP face sets it itself).
RETRY_AFTER_HEADER = "retry-after"
# During a canary rollout, requests that carry the same routing key (a user, a session) are
# answered by the same version; a header over REST, metadata over gRPC.
ROUTING_KEY_HEADER = "x-mlmesh-routing-key"
