"""An independent reader of istio-peer-exchange frames, written from the spec
without the engines' code: the tests hold both engines to it."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from fastmesh.defaults import DEFAULTS
from fastmesh.exchange import HEADER, MAGIC_BYTES, ExchangeError, decode_payload


class Outcome(enum.Enum):
    NEED_MORE = "need_more"  # keep the bytes, feed more
    FOUND = "found"  # a peer frame was read and removed; `rest` are application bytes
    NOT_FOUND = "not_found"  # no magic: every byte fed is application data, in order
    INVALID = "invalid"  # a frame header whose payload cannot be trusted: close the connection


@dataclass
class ReadResult:
    outcome: Outcome
    rest: bytes = b""  # application bytes to pass on (FOUND, NOT_FOUND)
    metadata: dict[str, Any] | None = None
    node_id: str = ""
    reason: str = ""  # why INVALID


class FrameReader:
    """Reads a peer's frame from the first bytes of a stream, fed in any splits.

    Bytes that start with something other than the magic are application data
    and are returned whole and in order. Once the magic has been seen, the bytes
    that follow belong to the frame; a frame that lies about its size or does not
    parse is INVALID: what came after it cannot be told apart from the payload.
    """

    def __init__(self, max_payload: int = DEFAULTS.exchange_max_payload) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()

    def feed(self, data: bytes) -> ReadResult:
        buffer = self._buffer
        buffer += data
        if len(buffer) < 4:
            if MAGIC_BYTES.startswith(bytes(buffer)):
                return ReadResult(Outcome.NEED_MORE)
            return self._not_found()
        if bytes(buffer[:4]) != MAGIC_BYTES:
            return self._not_found()
        if len(buffer) < HEADER.size:
            return ReadResult(Outcome.NEED_MORE)
        _, size = HEADER.unpack_from(buffer)
        if size > self.max_payload:
            return ReadResult(Outcome.INVALID, reason=f"declared payload of {size} bytes exceeds {self.max_payload}")
        end = HEADER.size + size
        if len(buffer) < end:
            return ReadResult(Outcome.NEED_MORE)
        try:
            metadata, node_id = decode_payload(bytes(buffer[HEADER.size:end]))
        except ExchangeError as exc:
            return ReadResult(Outcome.INVALID, reason=str(exc))
        rest = bytes(buffer[end:])
        buffer.clear()
        return ReadResult(Outcome.FOUND, rest, metadata, node_id)

    def _not_found(self) -> ReadResult:
        rest = bytes(self._buffer)
        self._buffer.clear()
        return ReadResult(Outcome.NOT_FOUND, rest)

    def pending(self) -> bytes:
        """Bytes held while waiting (for a stream that ends before the frame does)."""
        return bytes(self._buffer)
