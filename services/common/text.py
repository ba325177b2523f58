"""Text every request may carry: the one check, for every RPC and every HTTP path.

Names reach MLflow and PostgreSQL from many requests (models, experiments, runs, aliases,
jobs, sweeps, datasets), and a NUL character is one neither can take: PostgreSQL's text type
refuses it, and MLflow's server answers 500. Checking it here, for every string field of every
request message (the service interceptor runs ``check_message`` on each request it decodes)
and for path segments of the HTTP faces (``check_text``), means a new RPC or route cannot
forget it.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.common.errors import InvalidArgument

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def check_text(value: str, field: str) -> str:
    """``value``, or InvalidArgument naming ``field`` when it holds a NUL character."""
    if "\x00" in value:
        raise InvalidArgument(
            f"{field} contains a NUL character (U+0000 at index {value.index(chr(0))}), which "
            "no name or text field may hold"
        )
    return value


@cache
def _text_fields(descriptor: Descriptor) -> tuple[FieldDescriptor, ...]:
    """The fields of ``descriptor`` that can hold text: strings, and messages (maps
    included) that hold strings somewhere. Computed once per message type."""
    found = []
    for field in descriptor.fields:
        if field.type == _STRING or (
            field.type == _MESSAGE and _holds_text(field.message_type, frozenset())
        ):
            found.append(field)
    return tuple(found)


def _holds_text(descriptor: Descriptor, seen: frozenset[str]) -> bool:
    if descriptor.full_name in seen:  # a recursive message: its other fields decide
        return False
    seen = seen | {descriptor.full_name}
    return any(
        f.type == _STRING or (f.type == _MESSAGE and _holds_text(f.message_type, seen))
        for f in descriptor.fields
    )


def _strings(message: Message, prefix: str) -> Iterator[tuple[str, str]]:
    for field in _text_fields(message.DESCRIPTOR):
        name = f"{prefix}{field.name}"
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(key, str):
                    yield f"{name} key", key
                if isinstance(item, str):
                    yield f"{name}[{key!r}]", item
                elif isinstance(item, Message):
                    yield from _strings(item, f"{name}[{key!r}].")
        elif field.is_repeated:
            for i, item in enumerate(value):
                if isinstance(item, str):
                    yield f"{name}[{i}]", item
                else:
                    yield from _strings(item, f"{name}[{i}].")
        elif field.type == _STRING:
            yield name, value
        elif message.HasField(field.name):
            yield from _strings(value, f"{name}.")


def check_message(message: Message) -> None:
    """InvalidArgument naming the first string field of ``message`` (nested ones included)
    that holds a NUL character."""
    for field, value in _strings(message, ""):
        check_text(value, field)
