"""A LiveMap shared across processes over Redis (or Valkey).

``pip install "livemap[redis]"``.  Producers declare entries into a
:class:`RedisLiveMap` made inside a component; consumers in any process
follow it with a :class:`RedisLiveMapView`, which ``mount_each`` consumes like
a local LiveMap.  See ``docs/redis.md``.
"""

from __future__ import annotations

from typing import Any

from livemap._redis._codecs import (
    Codec,
    CodecError,
    JsonCodec,
    MsgpackCodec,
    decode_key,
    encode_key,
    shard_of,
)
from livemap._redis._producer import ProducerBusyError, RedisLiveMap, RedisMapStats
from livemap._redis._view import RedisLiveMapView, RedisViewStats

__all__ = [
    "Codec",
    "CodecError",
    "JsonCodec",
    "MsgpackCodec",
    "ProducerBusyError",
    "RedisLiveMap",
    "RedisLiveMapView",
    "RedisMapStats",
    "RedisViewStats",
    "connect",
    "decode_key",
    "encode_key",
    "shard_of",
]


def connect(url: str, **options: Any) -> Any:
    """A ``coredis.Redis`` client for ``url`` (``redis://``, ``rediss://`` for
    TLS, ``unix://``), with ``options`` passed on (``password``,
    ``ssl_context``, ``db``...); responses are never decoded.  Enter it
    around the run: ``async with connect(url) as client: ...``."""
    from coredis import Redis

    options["decode_responses"] = False
    return Redis.from_url(url, **options)
