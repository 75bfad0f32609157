"""Istio's `istio-peer-exchange` frames: an 8-byte header (magic 0x3D230467 and
the payload length, both big-endian) and a serialized google.protobuf.Any
holding a google.protobuf.Struct with `x-envoy-peer-metadata` (the node
metadata) and `x-envoy-peer-metadata-id` (the node id).

This module builds frames and decodes their payloads, and holds the settings a
listener gives the engine, which writes our frame and reads the peer's on the
data path (fastmesh/native/exchange.pxi, fastmesh/_engine_py.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Mapping

from google.protobuf import any_pb2, json_format, struct_pb2
from google.protobuf.message import DecodeError

from fastmesh.defaults import DEFAULTS
from fastmesh.routing import INBOUND, OUTBOUND

MAGIC = 0x3D230467
HEADER = struct.Struct("!II")
MAGIC_BYTES = struct.pack("!I", MAGIC)
STRUCT_TYPE_URL = "type.googleapis.com/google.protobuf.Struct"
METADATA_KEY = "x-envoy-peer-metadata"
ID_KEY = "x-envoy-peer-metadata-id"

# The node metadata keys Istio (1.8 and later) sends over TCP.
EXCHANGE_KEYS = (
    "NAME", "NAMESPACE", "OWNER", "WORKLOAD_NAME", "ISTIO_VERSION", "MESH_ID", "CLUSTER_ID",
    "LABELS", "PLATFORM_METADATA", "APP_CONTAINERS",
)


@dataclass(frozen=True)
class ExchangeSettings:
    """How a listener exchanges metadata; given to Engine.add_listener(exchange=...).

    outbound: our frame goes to each upstream endpoint that is a mesh peer as soon as the
    connection is up (ahead of any application byte), and the upstream's first
    bytes are read for its frame. inbound: the downstream's first bytes are read
    for a frame; a client that sent one gets ours in answer, ahead of the app's
    bytes, which wait for the client's first bytes for at most detect_timeout.
    """

    role: str
    frame: bytes  # our whole frame, from encode_frame(), built once
    max_payload: int = DEFAULTS.exchange_max_payload
    frame_timeout: float = DEFAULTS.exchange_timeout
    detect_timeout: float = DEFAULTS.exchange_detect_timeout
    plaintext: bool = False  # fastmesh's own variant: exchange on plaintext connections too

    def exchanges_with(self, is_mesh_peer: bool) -> bool:
        """Whether a connection exchanges: every one inbound; outbound, those whose
        upstream endpoint is a mesh peer (fastmesh.routing.Cluster.mesh_peers)."""
        return self.role == INBOUND or is_mesh_peer

    def check(self, buffer_size: int) -> None:
        """Raise ValueError for settings an engine cannot use."""
        if self.role not in (OUTBOUND, INBOUND):
            raise ValueError(f"exchange role must be {OUTBOUND!r} or {INBOUND!r}, not {self.role!r}")
        if len(self.frame) < HEADER.size or not self.frame.startswith(MAGIC_BYTES):
            raise ValueError("the exchange frame must start with the istio-peer-exchange header")
        if len(self.frame) > buffer_size:
            raise ValueError(f"the exchange frame ({len(self.frame)} bytes) exceeds the engine's "
                             f"buffer size ({buffer_size} bytes)")
        if not 0 <= self.max_payload <= 0xFFFFFFFF:
            raise ValueError(f"max_payload out of range: {self.max_payload}")
        for name in ("frame_timeout", "detect_timeout"):
            value = getattr(self, name)
            if not 0 < value < 1e9:
                raise ValueError(f"{name} must be positive, not {value!r}")


class ExchangeError(ValueError):
    """A payload that is not an Any holding a Struct with peer metadata."""


def encode_frame(metadata: Mapping[str, Any], node_id: str = "") -> bytes:
    """The whole frame for this node: built once per sidecar, not per connection."""
    peer = struct_pb2.Struct()
    json_format.ParseDict({k: metadata[k] for k in EXCHANGE_KEYS if k in metadata}, peer)
    outer = struct_pb2.Struct()
    outer.fields[METADATA_KEY].struct_value.CopyFrom(peer)
    if node_id:  # Istio leaves the id out when it is empty
        outer.fields[ID_KEY].string_value = node_id
    envelope = any_pb2.Any()
    envelope.Pack(outer, deterministic=True)
    payload = envelope.SerializeToString(deterministic=True)
    return HEADER.pack(MAGIC, len(payload)) + payload


def decode_payload(payload: bytes) -> tuple[dict[str, Any], str]:
    """(node metadata, node id) from a frame's payload."""
    envelope = any_pb2.Any()
    try:
        envelope.ParseFromString(payload)
    except DecodeError as exc:
        raise ExchangeError(f"payload is not a google.protobuf.Any: {exc}") from None
    if envelope.type_url != STRUCT_TYPE_URL:
        raise ExchangeError(f"payload holds {envelope.type_url!r}, not {STRUCT_TYPE_URL!r}")
    outer = struct_pb2.Struct()
    try:
        envelope.Unpack(outer)
    except DecodeError as exc:
        raise ExchangeError(f"payload's Struct does not parse: {exc}") from None
    metadata = outer.fields.get(METADATA_KEY)
    if metadata is None or metadata.WhichOneof("kind") != "struct_value":
        raise ExchangeError(f"payload has no {METADATA_KEY} struct")
    node_id = outer.fields[ID_KEY].string_value if ID_KEY in outer.fields else ""
    return json_format.MessageToDict(metadata.struct_value), node_id
