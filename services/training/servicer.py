"""mlmesh.training.v1.TrainingService: protobuf in, domain call, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from mlmesh.training.v1 import training_pb2 as pb
from mlmesh.training.v1 import training_pb2_grpc
from services.common.interceptors import current_client
from services.training import convert
from services.training.service import Training


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """Thin adapter from the generated service to the Training domain."""

    def __init__(self, training: Training) -> None:
        self._training = training

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
