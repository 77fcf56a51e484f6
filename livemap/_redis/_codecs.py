"""How keys and values cross processes: the key encoding, the value codecs
and the stable shard hash.

Keys are stable keys (:func:`livemap_core.normalize_key`); they are encoded
by one fixed, deterministic encoding, so that equal keys always give equal
bytes, whatever process encodes them.  Values go through a codec: JSON by
default, msgpack as an option, or any object with ``encode`` and ``decode``.
No codec here runs code from what it decodes (no pickle).
"""

from __future__ import annotations

import importlib
import json
import json.encoder
import struct
import uuid
import zlib
from typing import Any, Protocol, runtime_checkable

from livemap_core import Symbol, normalize_key

__all__ = [
    "Codec",
    "CodecError",
    "JsonCodec",
    "MsgpackCodec",
    "decode_key",
    "encode_key",
    "shard_of",
]

_LEN = struct.Struct(">I")


class CodecError(ValueError):
    """A value (or key) could not be encoded or decoded; the message names it."""


@runtime_checkable
class Codec(Protocol):
    """What turns values into bytes and back.

    ``encode(value)`` must be deterministic (equal values give equal bytes):
    the ``==`` gate in Redis compares encoded values.  ``decode`` must accept
    what ``encode`` produced, in any process.  A codec may also have
    ``decode_many(datas: list[bytes]) -> list``, equal to ``[decode(d) for d
    in datas]``: views then decode each batch read with one call; and
    ``encode_many(values: list) -> list[bytes]``, equal to ``[encode(v) for
    v in values]``: producers then encode each commit's values with one call
    (when it raises, the values are encoded one by one, so that the error
    names the key whose value failed).
    """

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# the C encoder behind json.JSONEncoder, made once rather than per value
# (None where the json module has no C part: JSONEncoder is used then)
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)


class JsonCodec:
    """Values as JSON (the default): ``None``, ``bool``, ``int``, ``float``,
    ``str``, lists and dicts with ``str`` keys.  Tuples come back as lists.
    Encoded with sorted keys and no spaces, so equal values give equal bytes."""

    __slots__ = ("_c_encode", "_decoder", "_encoder")

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(
            sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        # what JSONEncoder.encode runs, without its per-value set-up; no
        # check for circular structures (they end in RecursionError instead)
        self._c_encode: Any = None
        if _c_make_encoder is not None:
            self._c_encode = _c_make_encoder(
                None, _not_json, json.encoder.encode_basestring, None, ":", ",", True, False, False
            )
        self._decoder = json.JSONDecoder()

    def encode(self, value: Any) -> bytes:
        try:
            if self._c_encode is not None:
                return "".join(self._c_encode(value, 0)).encode()
            return self._encoder.encode(value).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise CodecError(f"cannot encode {value!r} as JSON: {exc}") from exc

    def decode(self, data: bytes) -> Any:
        return self._decoder.decode(data.decode())

    def encode_many(self, values: list[Any]) -> list[bytes]:
        """``[encode(v) for v in values]``, without a call per value."""
        c_encode = self._c_encode
        if c_encode is None:
            return [self.encode(v) for v in values]
        join = "".join
        try:
            return [join(c_encode(v, 0)).encode() for v in values]
        except (TypeError, ValueError, RecursionError):
            return [self.encode(v) for v in values]  # the failing one's CodecError

    def decode_many(self, datas: list[bytes]) -> list[Any]:
        """``[decode(d) for d in datas]``, parsed as one JSON array."""
        if len(datas) < 2:
            return [self.decode(d) for d in datas]
        try:
            out = self._decoder.decode("[" + b",".join(datas).decode() + "]")
        except ValueError:
            out = None
        if type(out) is not list or len(out) != len(datas):
            # not each a JSON value (the error is the failing one's)
            return [self.decode(d) for d in datas]
        return out

    def __repr__(self) -> str:
        return "JsonCodec()"


class MsgpackCodec:
    """Values as msgpack (needs the ``msgpack`` package): like JSON, plus
    ``bytes``; tuples come back as lists.  Maps keep their insertion order,
    so two dicts equal under ``==`` but built in different orders encode
    differently (the gate then sees a change that is none)."""

    __slots__ = ("_msgpack",)

    def __init__(self) -> None:
        try:
            msgpack = importlib.import_module("msgpack")
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "MsgpackCodec needs the msgpack package: pip install msgpack"
            ) from exc
        self._msgpack: Any = msgpack

    def encode(self, value: Any) -> bytes:
        try:
            data: bytes = self._msgpack.packb(value, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise CodecError(f"cannot encode {value!r} as msgpack: {exc}") from exc
        return data

    def decode(self, data: bytes) -> Any:
        return self._msgpack.unpackb(data, raw=False, strict_map_key=False)

    def __repr__(self) -> str:
        return "MsgpackCodec()"


# -- keys --------------------------------------------------------------------
#
# One tag byte, then the payload: n (None), i<decimal> (int, and bool as 0/1:
# ``True`` and ``1`` are one key), s<utf-8> (str), b<bytes>, u<16 bytes>
# (UUID), y<utf-8> (Symbol), and ( followed by each part as a 4-byte length
# and its encoding (tuple).


def _encode(key: Any) -> bytes:
    t = type(key)
    if t is str:
        return b"s" + str.encode(key, "utf-8", "surrogatepass")
    if t is int or t is bool:
        return b"i" + str(int(key)).encode()
    if t is bytes:
        return b"b" + bytes(key)
    if key is None:
        return b"n"
    if t is tuple:
        parts = [b"("]
        for part in key:
            enc = _encode(part)
            parts.append(_LEN.pack(len(enc)))
            parts.append(enc)
        return b"".join(parts)
    if t is uuid.UUID:
        return b"u" + bytes(key.bytes)
    if t is Symbol:
        return b"y" + str(key.name).encode("utf-8", "surrogatepass")
    raise TypeError(f"key {key!r} is not a stable key")  # pragma: no cover - normalized first


def encode_key(key: Any) -> bytes:
    """The bytes of the stable key ``key`` (a list counts as the equal tuple).

    Raises the same ``TypeError`` as a declaration for a key that is not stable."""
    return _encode(normalize_key(key))


def _decode(data: bytes) -> Any:
    tag = data[:1]
    if tag == b"s":
        return data[1:].decode("utf-8", "surrogatepass")
    if tag == b"i":
        return int(data[1:])
    if tag == b"b":
        return bytes(data[1:])
    if tag == b"n":
        return None
    if tag == b"(":
        parts = []
        pos = 1
        end = len(data)
        while pos < end:
            (size,) = _LEN.unpack_from(data, pos)
            pos += 4
            parts.append(_decode(data[pos : pos + size]))
            pos += size
        return tuple(parts)
    if tag == b"u":
        return uuid.UUID(bytes=bytes(data[1:17]))
    if tag == b"y":
        return Symbol(data[1:].decode("utf-8", "surrogatepass"))
    raise CodecError(f"not an encoded key: {bytes(data)!r}")


def decode_key(data: bytes) -> Any:
    """The stable key that :func:`encode_key` turned into ``data``."""
    return _decode(data)


def shard_of(encoded_key: bytes, shards: int) -> int:
    """The shard of an encoded key: CRC-32 of its bytes, modulo ``shards``
    (the same in every process, unlike ``hash()``)."""
    return zlib.crc32(encoded_key) % shards
