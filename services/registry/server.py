"""The Registry process: wires settings to the store, database, Redis and gRPC server."""

from __future__ import annotations

import logging

from mlmesh.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.process import Backends, ServiceParts, run_service
from services.common.server import Registration, configure_logging, configure_mlflow_client
from services.common.settings import Settings
from services.registry.registry import Registry
from services.registry.rollouts import Rollouts
from services.registry.servicer import RegistryServicer
from services.registry.serving import ServingCheck
from services.registry.store import RegistryStore

log = logging.getLogger(__name__)

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


def build(backends: Backends) -> ServiceParts:
    s = backends.settings
    serving = ServingCheck(
        s, s.registry_inference_target or s.inference_address, s.promotion_load_timeout_s
    )
    registry = Registry(
        RegistryStore(s.mlflow_tracking_uri),
        backends.pool,
        backends.redis,
        serving,
        s.promotion_metric,
        s.inference_follow_mlflow_aliases,
    )
    rollouts = Rollouts(registry, backends.pool, backends.redis)
    return ServiceParts(
        registrations=[
            Registration(
                RegistryServicer(registry, rollouts),
                registry_pb2_grpc.add_RegistryServiceServicer_to_server,
                SERVICE_NAME,
            )
        ],
        background=[
            registry.watch_aliases(s.registry_alias_check_interval_s),
            rollouts.control_forever(s.rollout_check_interval_s),
        ],
    )


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    configure_mlflow_client(settings)
    run_service(settings, settings.registry_address, settings.registry_ops_port, build)
