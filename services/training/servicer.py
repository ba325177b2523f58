"""mlmesh.training.v1.TrainingService: protobuf in, domain call, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from mlmesh.training.v1 import sweep_pb2 as sweep_pb
from mlmesh.training.v1 import training_pb2 as pb
from mlmesh.training.v1 import training_pb2_grpc
from services.common.interceptors import current_client
from services.training import convert
from services.training.service import Training
from services.training.sweeps.orchestrator import Sweeps


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """Thin adapter from the generated service to the Training domain."""

    def __init__(self, training: Training, sweeps: Sweeps) -> None:
        self._training = training
        self._sweeps = sweeps

    async def SubmitTrainingJob(
        self, request: pb.SubmitTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitTrainingJobResponse:
        job = await self._training.submit(convert.submission(request), current_client())
        return pb.SubmitTrainingJobResponse(job=convert.job(job))

    async def GetTrainingJob(
        self, request: pb.GetTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTrainingJobResponse:
        return pb.GetTrainingJobResponse(job=convert.job(await self._training.get(request.job_id)))

    async def ListTrainingJobs(
        self, request: pb.ListTrainingJobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTrainingJobsResponse:
        state = convert.PB_TO_STATE.get(request.state, "")
        page = await self._training.list(state, request.page_size, request.page_token)
        return pb.ListTrainingJobsResponse(
            jobs=[convert.job(j) for j in page.items], next_page_token=page.next_page_token
        )

    async def CancelTrainingJob(
        self, request: pb.CancelTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelTrainingJobResponse:
        job = await self._training.cancel(request.job_id, current_client())
        return pb.CancelTrainingJobResponse(job=convert.job(job))

    async def WatchTrainingJob(
        self, request: pb.WatchTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchTrainingJobResponse]:
        async for event in self._training.watch(request.job_id):
            yield convert.event(event)

    async def SubmitSweep(
        self, request: sweep_pb.SubmitSweepRequest, context: grpc.aio.ServicerContext
    ) -> sweep_pb.SubmitSweepResponse:
        sweep = await self._sweeps.submit(convert.sweep_submission(request), current_client())
        return sweep_pb.SubmitSweepResponse(sweep=convert.sweep(sweep))

    async def GetSweep(
        self, request: sweep_pb.GetSweepRequest, context: grpc.aio.ServicerContext
    ) -> sweep_pb.GetSweepResponse:
        sweep = await self._sweeps.get(request.sweep_id)
        return sweep_pb.GetSweepResponse(sweep=convert.sweep(sweep))

    async def ListSweeps(
        self, request: sweep_pb.ListSweepsRequest, context: grpc.aio.ServicerContext
    ) -> sweep_pb.ListSweepsResponse:
        state = convert.PB_TO_SWEEP_STATE.get(request.state, "")
        page = await self._sweeps.list(state, request.page_size, request.page_token)
        return sweep_pb.ListSweepsResponse(
            sweeps=[convert.sweep(s) for s in page.items], next_page_token=page.next_page_token
        )

    async def CancelSweep(
        self, request: sweep_pb.CancelSweepRequest, context: grpc.aio.ServicerContext
    ) -> sweep_pb.CancelSweepResponse:
        sweep = await self._sweeps.cancel(request.sweep_id, current_client())
        return sweep_pb.CancelSweepResponse(sweep=convert.sweep(sweep))

    async def WatchSweep(
        self, request: sweep_pb.WatchSweepRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[sweep_pb.WatchSweepResponse]:
        async for event in self._sweeps.watch(request.sweep_id):
            yield convert.sweep_event(event)
