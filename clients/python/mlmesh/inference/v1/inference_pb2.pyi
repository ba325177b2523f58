from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Image(_message.Message):
    __slots__ = ("pixels", "raw", "height", "width", "channels")
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    pixels: _containers.RepeatedScalarFieldContainer[float]
    raw: bytes
    height: int
    width: int
    channels: int
    def __init__(self, pixels: _Optional[_Iterable[float]] = ..., raw: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("prediction", "confidence", "probabilities", "cached", "class_name", "prediction_id")
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    prediction: int
    confidence: float
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    cached: bool
    class_name: str
    prediction_id: str
    def __init__(self, prediction: _Optional[int] = ..., confidence: _Optional[float] = ..., probabilities: _Optional[_Iterable[float]] = ..., cached: _Optional[bool] = ..., class_name: _Optional[str] = ..., prediction_id: _Optional[str] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("image", "image_raw", "model_name", "model_version", "height", "width", "channels")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_RAW_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    image: _containers.RepeatedScalarFieldContainer[float]
    image_raw: bytes
    model_name: str
    model_version: str
    height: int
    width: int
    channels: int
    def __init__(self, image: _Optional[_Iterable[float]] = ..., image_raw: _Optional[bytes] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("prediction", "confidence", "probabilities", "model_name", "model_version", "cached", "class_name", "prediction_id")
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    prediction: int
    confidence: float
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    model_name: str
    model_version: int
    cached: bool
    class_name: str
    prediction_id: str
    def __init__(self, prediction: _Optional[int] = ..., confidence: _Optional[float] = ..., probabilities: _Optional[_Iterable[float]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., cached: _Optional[bool] = ..., class_name: _Optional[str] = ..., prediction_id: _Optional[str] = ...) -> None: ...

class PredictBatchRequest(_message.Message):
    __slots__ = ("images", "model_name", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    model_name: str
    model_version: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class PredictBatchResponse(_message.Message):
    __slots__ = ("predictions", "model_name", "model_version")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_name: str
    model_version: int
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class PredictStreamRequest(_message.Message):
    __slots__ = ("request_id", "image", "model_name", "model_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    image: Image
    model_name: str
    model_version: str
    def __init__(self, request_id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class PredictStreamResponse(_message.Message):
    __slots__ = ("request_id", "prediction", "model_name", "model_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prediction: Prediction
    model_name: str
    model_version: int
    def __init__(self, request_id: _Optional[str] = ..., prediction: _Optional[_Union[Prediction, _Mapping]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class LoadModelVersionRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class LoadModelVersionResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "runtime", "already_loaded")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    ALREADY_LOADED_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    runtime: str
    already_loaded: bool
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., runtime: _Optional[str] = ..., already_loaded: _Optional[bool] = ...) -> None: ...

class Feedback(_message.Message):
    __slots__ = ("prediction_id", "label")
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    prediction_id: str
    label: int
    def __init__(self, prediction_id: _Optional[str] = ..., label: _Optional[int] = ...) -> None: ...

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("feedback",)
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    feedback: _containers.RepeatedCompositeFieldContainer[Feedback]
    def __init__(self, feedback: _Optional[_Iterable[_Union[Feedback, _Mapping]]] = ...) -> None: ...

class SubmitFeedbackResponse(_message.Message):
    __slots__ = ("recorded", "correct", "unknown_ids")
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_IDS_FIELD_NUMBER: _ClassVar[int]
    recorded: int
    correct: int
    unknown_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, recorded: _Optional[int] = ..., correct: _Optional[int] = ..., unknown_ids: _Optional[_Iterable[str]] = ...) -> None: ...
