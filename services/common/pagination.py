"""Opaque page tokens for keyset pagination over mlmesh's own tables."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from services.common.errors import InvalidArgument

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of results and the token of the next (empty on the last)."""

    items: list[T]
    next_page_token: str


def encode_token(kind: str, cursor: list[Any]) -> str:
    """A token that resumes a ``kind`` listing after ``cursor`` (the last row's sort key)."""
    return base64.urlsafe_b64encode(json.dumps([kind, cursor]).encode()).decode()


def decode_token(kind: str, token: str) -> list[Any]:
    """The cursor inside a token this API issued for ``kind``; INVALID_ARGUMENT otherwise."""
    try:
        found, cursor = json.loads(base64.urlsafe_b64decode(token.encode()))
        if found != kind or not isinstance(cursor, list):
            raise ValueError(found)
        return cursor
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"page_token {token!r} is not a token this API issued") from exc
