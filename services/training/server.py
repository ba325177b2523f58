"""The Training process: gRPC service, ops HTTP, and the reconciler of unfinished jobs."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from mlmesh.datasets.v1 import datasets_pb2, datasets_pb2_grpc
from mlmesh.training.v1 import training_pb2, training_pb2_grpc
from services.common.process import Backends, ServiceParts, run_service
from services.common.server import Registration, configure_logging, configure_mlflow_client
from services.common.settings import Settings
from services.datasets.formats import cpu_count
from services.datasets.service import Datasets
from services.datasets.servicer import DatasetServicer
from services.training.jobs import JobStore
from services.training.ml.search import storage_url
from services.training.service import Training
from services.training.servicer import TrainingServicer
from services.training.sweeps.orchestrator import Sweeps
from services.training.sweeps.store import SweepStore

SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name
DATASETS_SERVICE_NAME = datasets_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name


def datasets_of(backends: Backends, jobs: JobStore) -> Datasets:
    """The Datasets domain this process serves: uploads decode images in processes of their
    own, one per core, started now so that the first upload does not wait for them."""
    decode = ProcessPoolExecutor(cpu_count(), mp_context=multiprocessing.get_context("spawn"))
    for _ in range(cpu_count()):
        decode.submit(int)
    return Datasets.from_settings(backends.settings, backends.pool, jobs.using_dataset, decode)


def build(backends: Backends) -> ServiceParts:
    s = backends.settings
    jobs = JobStore(backends.pool, backends.redis)
    datasets = datasets_of(backends, jobs)
    training = Training(jobs, backends.redis, s.training_queue, datasets)
    sweeps = Sweeps(
        SweepStore(backends.pool, backends.redis),
        training,
        storage_url(s.database_url),
        s.mlflow_tracking_uri,
    )
    return ServiceParts(
        registrations=[
            Registration(
                TrainingServicer(training, sweeps),
                training_pb2_grpc.add_TrainingServiceServicer_to_server,
                SERVICE_NAME,
            ),
            Registration(
                DatasetServicer(datasets),
                datasets_pb2_grpc.add_DatasetServiceServicer_to_server,
                DATASETS_SERVICE_NAME,
            ),
        ],
        background=[
            training.reconcile_forever(s.training_reconcile_interval_s),
            sweeps.reconcile_forever(s.training_reconcile_interval_s),
        ],
    )


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    configure_mlflow_client(settings)  # sweeps open and close their parent runs here
    run_service(settings, settings.training_address, settings.training_ops_port, build)
