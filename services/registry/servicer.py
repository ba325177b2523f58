"""mlmesh.registry.v1.RegistryService: protobuf in, domain call, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from mlmesh.registry.v1 import registry_pb2 as pb
from mlmesh.registry.v1 import registry_pb2_grpc
from services.common.interceptors import current_client
from services.registry import convert
from services.registry.registry import Registry
from services.registry.rollouts import Rollouts


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """Thin adapter from the generated service to the Registry domain."""

    def __init__(
        self, registry: Registry, rollouts: Rollouts, watch_interval_s: float = 0.5
    ) -> None:
        self._registry = registry
        self._rollouts = rollouts
        self._watch_interval_s = watch_interval_s

    async def ListExperiments(
        self, request: pb.ListExperimentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListExperimentsResponse:
        page = await self._registry.list_experiments(
            request.page_size, request.page_token, request.filter, list(request.order_by)
        )
        return pb.ListExperimentsResponse(
            experiments=[convert.experiment(e) for e in page.items],
            next_page_token=page.next_page_token,
        )

    async def GetExperiment(
        self, request: pb.GetExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetExperimentResponse:
        found = await self._registry.get_experiment(request.experiment_id)
        return pb.GetExperimentResponse(experiment=convert.experiment(found))

    async def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRunsResponse:
        page = await self._registry.list_runs(
            list(request.experiment_ids),
            request.filter,
            list(request.order_by),
            request.page_size,
            request.page_token,
        )
        return pb.ListRunsResponse(
            runs=[convert.run(r) for r in page.items], next_page_token=page.next_page_token
        )

    async def GetRun(
        self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRunResponse:
        return pb.GetRunResponse(run=convert.run(await self._registry.get_run(request.run_id)))

    async def GetMetricHistory(
        self, request: pb.GetMetricHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMetricHistoryResponse:
        history = await self._registry.get_metric_history(request.run_id, request.metric_key)
        return pb.GetMetricHistoryResponse(metrics=[convert.metric(m) for m in history])

    async def ListArtifacts(
        self, request: pb.ListArtifactsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListArtifactsResponse:
        root, files = await self._registry.list_artifacts(request.run_id, request.path)
        return pb.ListArtifactsResponse(root_uri=root, files=[convert.file_info(f) for f in files])

    async def ListRegisteredModels(
        self, request: pb.ListRegisteredModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRegisteredModelsResponse:
        page = await self._registry.list_registered_models(
            request.page_size, request.page_token, request.filter
        )
        return pb.ListRegisteredModelsResponse(
            registered_models=[convert.registered_model(m) for m in page.items],
            next_page_token=page.next_page_token,
        )

    async def GetRegisteredModel(
        self, request: pb.GetRegisteredModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRegisteredModelResponse:
        found = await self._registry.get_registered_model(request.name)
        return pb.GetRegisteredModelResponse(registered_model=convert.registered_model(found))

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelVersionsResponse:
        page = await self._registry.list_model_versions(
            request.name, request.page_size, request.page_token
        )
        return pb.ListModelVersionsResponse(
            model_versions=[convert.model_version(v) for v in page.items],
            next_page_token=page.next_page_token,
        )

    async def GetModelVersion(
        self, request: pb.GetModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelVersionResponse:
        found = await self._registry.get_model_version(request.name, request.version, request.alias)
        return pb.GetModelVersionResponse(model_version=convert.model_version(found))

    async def TransitionModelVersion(
        self, request: pb.TransitionModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.TransitionModelVersionResponse:
        done = await self._registry.transition(
            current_client(),
            request.model_name,
            request.version,
            request.stage,
            request.archive_existing_versions,
            request.force,
        )
        return pb.TransitionModelVersionResponse(
            model_version=convert.model_version(done.change.model_version),
            previous_version=done.change.previous_version,
            archived_versions=done.change.archived_versions,
            audit_event=convert.audit_event(done.event),
            comparison=convert.comparison(done.comparison) if done.comparison else None,
            forced=done.forced,
        )

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAuditEventsResponse:
        page = await self._registry.list_audit_events(
            request.model_name, request.page_size, request.page_token
        )
        return pb.ListAuditEventsResponse(
            audit_events=[convert.audit_event(e) for e in page.items],
            next_page_token=page.next_page_token,
        )

    async def StartRollout(
        self, request: pb.StartRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartRolloutResponse:
        view = await self._rollouts.start(
            current_client(),
            request.model_name,
            request.candidate_version,
            convert.mode(request.mode),
            request.weight,
            list(request.weight_steps),
            request.step_interval_seconds,
            convert.guards(request.guards) if request.HasField("guards") else None,
        )
        return pb.StartRolloutResponse(rollout=convert.rollout(view))

    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRolloutResponse:
        view = await self._rollouts.get(request.rollout_id)
        return pb.GetRolloutResponse(rollout=convert.rollout(view))

    async def ListRollouts(
        self, request: pb.ListRolloutsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRolloutsResponse:
        page = await self._rollouts.list(request.model_name, request.page_size, request.page_token)
        return pb.ListRolloutsResponse(
            rollouts=[convert.rollout(v) for v in page.items],
            next_page_token=page.next_page_token,
        )

    async def WatchRollout(
        self, request: pb.WatchRolloutRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchRolloutResponse]:
        async for view in self._rollouts.watch(request.rollout_id, self._watch_interval_s):
            yield pb.WatchRolloutResponse(rollout=convert.rollout(view))

    async def PromoteRollout(
        self, request: pb.PromoteRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.PromoteRolloutResponse:
        view = await self._rollouts.promote(current_client(), request.rollout_id)
        return pb.PromoteRolloutResponse(rollout=convert.rollout(view))

    async def AbortRollout(
        self, request: pb.AbortRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortRolloutResponse:
        view = await self._rollouts.abort(current_client(), request.rollout_id, request.reason)
        return pb.AbortRolloutResponse(rollout=convert.rollout(view))
