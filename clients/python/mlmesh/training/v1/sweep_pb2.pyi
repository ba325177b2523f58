import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SweepState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SWEEP_STATE_UNSPECIFIED: _ClassVar[SweepState]
    SWEEP_STATE_QUEUED: _ClassVar[SweepState]
    SWEEP_STATE_RUNNING: _ClassVar[SweepState]
    SWEEP_STATE_SUCCEEDED: _ClassVar[SweepState]
    SWEEP_STATE_FAILED: _ClassVar[SweepState]
    SWEEP_STATE_CANCELLED: _ClassVar[SweepState]

class SearchStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEARCH_STRATEGY_UNSPECIFIED: _ClassVar[SearchStrategy]
    SEARCH_STRATEGY_GRID: _ClassVar[SearchStrategy]
    SEARCH_STRATEGY_RANDOM: _ClassVar[SearchStrategy]
    SEARCH_STRATEGY_TPE: _ClassVar[SearchStrategy]

class ObjectiveDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OBJECTIVE_DIRECTION_UNSPECIFIED: _ClassVar[ObjectiveDirection]
    OBJECTIVE_DIRECTION_MAXIMIZE: _ClassVar[ObjectiveDirection]
    OBJECTIVE_DIRECTION_MINIMIZE: _ClassVar[ObjectiveDirection]

class Scale(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCALE_UNSPECIFIED: _ClassVar[Scale]
    SCALE_LINEAR: _ClassVar[Scale]
    SCALE_LOG: _ClassVar[Scale]

class Pruner(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRUNER_UNSPECIFIED: _ClassVar[Pruner]
    PRUNER_MEDIAN: _ClassVar[Pruner]
    PRUNER_SUCCESSIVE_HALVING: _ClassVar[Pruner]

class TrialState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRIAL_STATE_UNSPECIFIED: _ClassVar[TrialState]
    TRIAL_STATE_RUNNING: _ClassVar[TrialState]
    TRIAL_STATE_COMPLETE: _ClassVar[TrialState]
    TRIAL_STATE_PRUNED: _ClassVar[TrialState]
    TRIAL_STATE_FAILED: _ClassVar[TrialState]
    TRIAL_STATE_CANCELLED: _ClassVar[TrialState]
SWEEP_STATE_UNSPECIFIED: SweepState
SWEEP_STATE_QUEUED: SweepState
SWEEP_STATE_RUNNING: SweepState
SWEEP_STATE_SUCCEEDED: SweepState
SWEEP_STATE_FAILED: SweepState
SWEEP_STATE_CANCELLED: SweepState
SEARCH_STRATEGY_UNSPECIFIED: SearchStrategy
SEARCH_STRATEGY_GRID: SearchStrategy
SEARCH_STRATEGY_RANDOM: SearchStrategy
SEARCH_STRATEGY_TPE: SearchStrategy
OBJECTIVE_DIRECTION_UNSPECIFIED: ObjectiveDirection
OBJECTIVE_DIRECTION_MAXIMIZE: ObjectiveDirection
OBJECTIVE_DIRECTION_MINIMIZE: ObjectiveDirection
SCALE_UNSPECIFIED: Scale
SCALE_LINEAR: Scale
SCALE_LOG: Scale
PRUNER_UNSPECIFIED: Pruner
PRUNER_MEDIAN: Pruner
PRUNER_SUCCESSIVE_HALVING: Pruner
TRIAL_STATE_UNSPECIFIED: TrialState
TRIAL_STATE_RUNNING: TrialState
TRIAL_STATE_COMPLETE: TrialState
TRIAL_STATE_PRUNED: TrialState
TRIAL_STATE_FAILED: TrialState
TRIAL_STATE_CANCELLED: TrialState

class Choice(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Value]
    def __init__(self, values: _Optional[_Iterable[_Union[_struct_pb2.Value, _Mapping]]] = ...) -> None: ...

class FloatRange(_message.Message):
    __slots__ = ("low", "high", "scale")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    low: float
    high: float
    scale: Scale
    def __init__(self, low: _Optional[float] = ..., high: _Optional[float] = ..., scale: _Optional[_Union[Scale, str]] = ...) -> None: ...

class IntRange(_message.Message):
    __slots__ = ("low", "high", "step", "scale")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    low: int
    high: int
    step: int
    scale: Scale
    def __init__(self, low: _Optional[int] = ..., high: _Optional[int] = ..., step: _Optional[int] = ..., scale: _Optional[_Union[Scale, str]] = ...) -> None: ...

class ParameterSpace(_message.Message):
    __slots__ = ("choice", "range", "int_range")
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    INT_RANGE_FIELD_NUMBER: _ClassVar[int]
    choice: Choice
    range: FloatRange
    int_range: IntRange
    def __init__(self, choice: _Optional[_Union[Choice, _Mapping]] = ..., range: _Optional[_Union[FloatRange, _Mapping]] = ..., int_range: _Optional[_Union[IntRange, _Mapping]] = ...) -> None: ...

class EarlyStopping(_message.Message):
    __slots__ = ("pruner", "startup_trials", "warmup_epochs", "reduction_factor")
    PRUNER_FIELD_NUMBER: _ClassVar[int]
    STARTUP_TRIALS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FACTOR_FIELD_NUMBER: _ClassVar[int]
    pruner: Pruner
    startup_trials: int
    warmup_epochs: int
    reduction_factor: int
    def __init__(self, pruner: _Optional[_Union[Pruner, str]] = ..., startup_trials: _Optional[int] = ..., warmup_epochs: _Optional[int] = ..., reduction_factor: _Optional[int] = ...) -> None: ...

class Trial(_message.Message):
    __slots__ = ("number", "state", "job_id", "params", "value", "epochs_completed", "mlflow_run_id", "metrics", "error")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    number: int
    state: TrialState
    job_id: str
    params: _containers.MessageMap[str, _struct_pb2.Value]
    value: float
    epochs_completed: int
    mlflow_run_id: str
    metrics: _containers.ScalarMap[str, float]
    error: str
    def __init__(self, number: _Optional[int] = ..., state: _Optional[_Union[TrialState, str]] = ..., job_id: _Optional[str] = ..., params: _Optional[_Mapping[str, _struct_pb2.Value]] = ..., value: _Optional[float] = ..., epochs_completed: _Optional[int] = ..., mlflow_run_id: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ...) -> None: ...

class Sweep(_message.Message):
    __slots__ = ("sweep_id", "state", "dataset", "epochs", "architecture", "train_subset", "search_space", "objective_metric", "direction", "strategy", "max_trials", "parallelism", "early_stopping", "experiment_name", "model_name", "mlflow_run_id", "trials", "best_trial", "best_value", "best_params", "model_version", "seed", "error", "submitted_by", "idempotency_key", "study_name", "create_time", "end_time", "learning_rate", "batch_size", "optimizer", "cancelled_by", "augment")
    class SearchSpaceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ParameterSpace
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ParameterSpace, _Mapping]] = ...) -> None: ...
    class BestParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SUBSET_FIELD_NUMBER: _ClassVar[int]
    SEARCH_SPACE_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_METRIC_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MAX_TRIALS_FIELD_NUMBER: _ClassVar[int]
    PARALLELISM_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    BEST_TRIAL_FIELD_NUMBER: _ClassVar[int]
    BEST_VALUE_FIELD_NUMBER: _ClassVar[int]
    BEST_PARAMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_BY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_BY_FIELD_NUMBER: _ClassVar[int]
    AUGMENT_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    state: SweepState
    dataset: str
    epochs: int
    architecture: str
    train_subset: int
    search_space: _containers.MessageMap[str, ParameterSpace]
    objective_metric: str
    direction: ObjectiveDirection
    strategy: SearchStrategy
    max_trials: int
    parallelism: int
    early_stopping: EarlyStopping
    experiment_name: str
    model_name: str
    mlflow_run_id: str
    trials: _containers.RepeatedCompositeFieldContainer[Trial]
    best_trial: int
    best_value: float
    best_params: _containers.MessageMap[str, _struct_pb2.Value]
    model_version: int
    seed: int
    error: str
    submitted_by: str
    idempotency_key: str
    study_name: str
    create_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    learning_rate: float
    batch_size: int
    optimizer: str
    cancelled_by: str
    augment: bool
    def __init__(self, sweep_id: _Optional[str] = ..., state: _Optional[_Union[SweepState, str]] = ..., dataset: _Optional[str] = ..., epochs: _Optional[int] = ..., architecture: _Optional[str] = ..., train_subset: _Optional[int] = ..., search_space: _Optional[_Mapping[str, ParameterSpace]] = ..., objective_metric: _Optional[str] = ..., direction: _Optional[_Union[ObjectiveDirection, str]] = ..., strategy: _Optional[_Union[SearchStrategy, str]] = ..., max_trials: _Optional[int] = ..., parallelism: _Optional[int] = ..., early_stopping: _Optional[_Union[EarlyStopping, _Mapping]] = ..., experiment_name: _Optional[str] = ..., model_name: _Optional[str] = ..., mlflow_run_id: _Optional[str] = ..., trials: _Optional[_Iterable[_Union[Trial, _Mapping]]] = ..., best_trial: _Optional[int] = ..., best_value: _Optional[float] = ..., best_params: _Optional[_Mapping[str, _struct_pb2.Value]] = ..., model_version: _Optional[int] = ..., seed: _Optional[int] = ..., error: _Optional[str] = ..., submitted_by: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., study_name: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., optimizer: _Optional[str] = ..., cancelled_by: _Optional[str] = ..., augment: _Optional[bool] = ...) -> None: ...

class SubmitSweepRequest(_message.Message):
    __slots__ = ("dataset", "architecture", "epochs", "learning_rate", "batch_size", "optimizer", "seed", "train_subset", "search_space", "objective_metric", "direction", "max_trials", "parallelism", "strategy", "early_stopping", "experiment_name", "model_name", "idempotency_key", "augment")
    class SearchSpaceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ParameterSpace
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ParameterSpace, _Mapping]] = ...) -> None: ...
    DATASET_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SUBSET_FIELD_NUMBER: _ClassVar[int]
    SEARCH_SPACE_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_METRIC_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    MAX_TRIALS_FIELD_NUMBER: _ClassVar[int]
    PARALLELISM_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    AUGMENT_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    architecture: str
    epochs: int
    learning_rate: float
    batch_size: int
    optimizer: str
    seed: int
    train_subset: int
    search_space: _containers.MessageMap[str, ParameterSpace]
    objective_metric: str
    direction: ObjectiveDirection
    max_trials: int
    parallelism: int
    strategy: SearchStrategy
    early_stopping: EarlyStopping
    experiment_name: str
    model_name: str
    idempotency_key: str
    augment: bool
    def __init__(self, dataset: _Optional[str] = ..., architecture: _Optional[str] = ..., epochs: _Optional[int] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., optimizer: _Optional[str] = ..., seed: _Optional[int] = ..., train_subset: _Optional[int] = ..., search_space: _Optional[_Mapping[str, ParameterSpace]] = ..., objective_metric: _Optional[str] = ..., direction: _Optional[_Union[ObjectiveDirection, str]] = ..., max_trials: _Optional[int] = ..., parallelism: _Optional[int] = ..., strategy: _Optional[_Union[SearchStrategy, str]] = ..., early_stopping: _Optional[_Union[EarlyStopping, _Mapping]] = ..., experiment_name: _Optional[str] = ..., model_name: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., augment: _Optional[bool] = ...) -> None: ...

class SubmitSweepResponse(_message.Message):
    __slots__ = ("sweep",)
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    sweep: Sweep
    def __init__(self, sweep: _Optional[_Union[Sweep, _Mapping]] = ...) -> None: ...

class GetSweepRequest(_message.Message):
    __slots__ = ("sweep_id",)
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    def __init__(self, sweep_id: _Optional[str] = ...) -> None: ...

class GetSweepResponse(_message.Message):
    __slots__ = ("sweep",)
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    sweep: Sweep
    def __init__(self, sweep: _Optional[_Union[Sweep, _Mapping]] = ...) -> None: ...

class ListSweepsRequest(_message.Message):
    __slots__ = ("state", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: SweepState
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[SweepState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSweepsResponse(_message.Message):
    __slots__ = ("sweeps", "next_page_token")
    SWEEPS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sweeps: _containers.RepeatedCompositeFieldContainer[Sweep]
    next_page_token: str
    def __init__(self, sweeps: _Optional[_Iterable[_Union[Sweep, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelSweepRequest(_message.Message):
    __slots__ = ("sweep_id",)
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    def __init__(self, sweep_id: _Optional[str] = ...) -> None: ...

class CancelSweepResponse(_message.Message):
    __slots__ = ("sweep",)
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    sweep: Sweep
    def __init__(self, sweep: _Optional[_Union[Sweep, _Mapping]] = ...) -> None: ...

class WatchSweepRequest(_message.Message):
    __slots__ = ("sweep_id",)
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    def __init__(self, sweep_id: _Optional[str] = ...) -> None: ...

class SweepQueued(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrialStarted(_message.Message):
    __slots__ = ("trial_number", "job_id", "params", "attempt", "mlflow_run_id")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    TRIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    trial_number: int
    job_id: str
    params: _containers.MessageMap[str, _struct_pb2.Value]
    attempt: int
    mlflow_run_id: str
    def __init__(self, trial_number: _Optional[int] = ..., job_id: _Optional[str] = ..., params: _Optional[_Mapping[str, _struct_pb2.Value]] = ..., attempt: _Optional[int] = ..., mlflow_run_id: _Optional[str] = ...) -> None: ...

class TrialEpoch(_message.Message):
    __slots__ = ("trial_number", "epoch", "total_epochs", "value")
    TRIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    trial_number: int
    epoch: int
    total_epochs: int
    value: float
    def __init__(self, trial_number: _Optional[int] = ..., epoch: _Optional[int] = ..., total_epochs: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...

class TrialEnded(_message.Message):
    __slots__ = ("trial_number", "state", "value", "epochs_completed", "error")
    TRIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    trial_number: int
    state: TrialState
    value: float
    epochs_completed: int
    error: str
    def __init__(self, trial_number: _Optional[int] = ..., state: _Optional[_Union[TrialState, str]] = ..., value: _Optional[float] = ..., epochs_completed: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class NewBest(_message.Message):
    __slots__ = ("trial_number", "value", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    TRIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    trial_number: int
    value: float
    params: _containers.MessageMap[str, _struct_pb2.Value]
    def __init__(self, trial_number: _Optional[int] = ..., value: _Optional[float] = ..., params: _Optional[_Mapping[str, _struct_pb2.Value]] = ...) -> None: ...

class SweepSucceeded(_message.Message):
    __slots__ = ("best_trial", "best_value", "best_params", "model_name", "model_version", "metrics")
    class BestParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    BEST_TRIAL_FIELD_NUMBER: _ClassVar[int]
    BEST_VALUE_FIELD_NUMBER: _ClassVar[int]
    BEST_PARAMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    best_trial: int
    best_value: float
    best_params: _containers.MessageMap[str, _struct_pb2.Value]
    model_name: str
    model_version: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, best_trial: _Optional[int] = ..., best_value: _Optional[float] = ..., best_params: _Optional[_Mapping[str, _struct_pb2.Value]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SweepFailed(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: str
    def __init__(self, error: _Optional[str] = ...) -> None: ...

class SweepCancelled(_message.Message):
    __slots__ = ("cancelled_by",)
    CANCELLED_BY_FIELD_NUMBER: _ClassVar[int]
    cancelled_by: str
    def __init__(self, cancelled_by: _Optional[str] = ...) -> None: ...

class WatchSweepResponse(_message.Message):
    __slots__ = ("sweep_id", "sequence", "time", "queued", "trial_started", "trial_epoch", "trial_ended", "new_best", "succeeded", "failed", "cancelled")
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    TRIAL_STARTED_FIELD_NUMBER: _ClassVar[int]
    TRIAL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    TRIAL_ENDED_FIELD_NUMBER: _ClassVar[int]
    NEW_BEST_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    sequence: int
    time: _timestamp_pb2.Timestamp
    queued: SweepQueued
    trial_started: TrialStarted
    trial_epoch: TrialEpoch
    trial_ended: TrialEnded
    new_best: NewBest
    succeeded: SweepSucceeded
    failed: SweepFailed
    cancelled: SweepCancelled
    def __init__(self, sweep_id: _Optional[str] = ..., sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., queued: _Optional[_Union[SweepQueued, _Mapping]] = ..., trial_started: _Optional[_Union[TrialStarted, _Mapping]] = ..., trial_epoch: _Optional[_Union[TrialEpoch, _Mapping]] = ..., trial_ended: _Optional[_Union[TrialEnded, _Mapping]] = ..., new_best: _Optional[_Union[NewBest, _Mapping]] = ..., succeeded: _Optional[_Union[SweepSucceeded, _Mapping]] = ..., failed: _Optional[_Union[SweepFailed, _Mapping]] = ..., cancelled: _Optional[_Union[SweepCancelled, _Mapping]] = ...) -> None: ...
