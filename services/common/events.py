"""Redis channels the services publish on and subscribe to."""

from __future__ import annotations

# The Registry publishes one JSON message here per transition; inference replicas reload on it.
MODEL_EVENTS_CHANNEL = "mlmesh:registry:model-events"
