"""mlmesh.datasets.v1.DatasetService: protobuf in, the Datasets domain, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from mlmesh.datasets.v1 import datasets_pb2 as pb
from mlmesh.datasets.v1 import datasets_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.interceptors import current_client
from services.datasets.arrays import IMAGES, TEST, TRAIN, VALIDATION
from services.datasets.formats import CSV, IMAGE_FOLDER, NPZ, PARQUET
from services.datasets.service import Datasets, Upload
from services.datasets.store import DatasetRecord

FORMATS = {
    pb.DATASET_FORMAT_UNSPECIFIED: "",
    pb.DATASET_FORMAT_IMAGE_FOLDER: IMAGE_FOLDER,
    pb.DATASET_FORMAT_CSV: CSV,
    pb.DATASET_FORMAT_PARQUET: PARQUET,
    pb.DATASET_FORMAT_NPZ: NPZ,
}
FORMATS_PB = {v: k for k, v in FORMATS.items()}
SPLITS = {
    pb.DATASET_SPLIT_UNSPECIFIED: TEST,
    pb.DATASET_SPLIT_TRAIN: TRAIN,
    pb.DATASET_SPLIT_VALIDATION: VALIDATION,
    pb.DATASET_SPLIT_TEST: TEST,
}


def dataset(r: DatasetRecord) -> pb.Dataset:
    """A stored version as its message."""
    images = r.kind == IMAGES
    out = pb.Dataset(
        name=r.name,
        version=r.version,
        kind=pb.DATASET_KIND_IMAGES if images else pb.DATASET_KIND_TABLE,
        format=FORMATS_PB.get(r.format, pb.DATASET_FORMAT_UNSPECIFIED),
        digest=r.digest,
        samples=r.samples,
        classes=[
            pb.ClassCount(name=n, count=c)
            for n, c in zip(r.class_names, r.class_counts, strict=True)
        ],
        columns=[pb.Column(name=n, type=t) for n, t in r.columns],
        label_column=r.label_column,
        splits=pb.SplitSizes(
            train=r.split_sizes[0],
            validation=r.split_sizes[1],
            test=r.split_sizes[2],
            from_upload=r.split_from_upload,
        ),
        builtin=r.builtin,
        mlflow_run_id=r.mlflow_run_id,
        size_bytes=r.size_bytes,
        filename=r.filename,
        created_by=r.created_by,
    )
    if images:
        out.height, out.width, out.channels = r.input_shape
    if r.create_time is not None:
        out.create_time.CopyFrom(_ts(r.create_time))
    return out


def _ts(when: object) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)  # type: ignore[arg-type]
    return ts


class DatasetServicer(datasets_pb2_grpc.DatasetServiceServicer):
    """Thin adapter from the generated service to the Datasets domain."""

    def __init__(self, datasets: Datasets) -> None:
        self._datasets = datasets

    async def UploadDataset(
        self,
        request_iterator: AsyncIterator[pb.UploadDatasetRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadDatasetResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            raise InvalidArgument("the upload has no messages: send the options, then the file")
        if first.format not in FORMATS:
            raise InvalidArgument(f"format {first.format} is not a known DatasetFormat")
        options = self._datasets.options(
            FORMATS[first.format],
            first.label_column,
            (first.resize_height, first.resize_width),
            first.validation_fraction,
            first.test_fraction,
            first.split_seed,
        )
        upload = Upload(first.name, options, first.filename)

        async def chunks() -> AsyncIterator[bytes]:
            yield first.file.data
            async for message in request_iterator:
                yield message.file.data

        record, created = await self._datasets.upload(upload, chunks(), current_client())
        return pb.UploadDatasetResponse(dataset=dataset(record), created=created)

    async def GetDataset(
        self, request: pb.GetDatasetRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDatasetResponse:
        found = await self._datasets.get(request.name, request.version)
        return pb.GetDatasetResponse(dataset=dataset(found))

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDatasetsResponse:
        page = await self._datasets.list(request.page_size, request.page_token)
        return pb.ListDatasetsResponse(
            datasets=[dataset(r) for r in page.items], next_page_token=page.next_page_token
        )

    async def ListDatasetVersions(
        self, request: pb.ListDatasetVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDatasetVersionsResponse:
        page = await self._datasets.versions(request.name, request.page_size, request.page_token)
        return pb.ListDatasetVersionsResponse(
            datasets=[dataset(r) for r in page.items], next_page_token=page.next_page_token
        )

    async def DeleteDatasetVersion(
        self, request: pb.DeleteDatasetVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDatasetVersionResponse:
        gone = await self._datasets.delete(request.name, request.version)
        return pb.DeleteDatasetVersionResponse(dataset=dataset(gone))

    async def GetDatasetSample(
        self, request: pb.GetDatasetSampleRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDatasetSampleResponse:
        if request.split not in SPLITS:
            raise InvalidArgument(f"split {request.split} is not a known DatasetSplit")
        found = await self._datasets.sample(
            request.name, request.version, request.index, SPLITS[request.split]
        )
        out = pb.GetDatasetSampleResponse(
            dataset=dataset(found.dataset), label=found.label, class_name=found.class_name
        )
        values = np.asarray(found.x).ravel().tolist()
        if found.dataset.kind == IMAGES:
            out.pixels.extend(values)
        else:
            out.values.extend(values)
        return out
