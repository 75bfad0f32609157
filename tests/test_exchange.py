"""istio-peer-exchange frames: Istio's exact bytes, an independent encoder and
decoder, bad input, and application bytes exact and in order under any split."""

from __future__ import annotations

import struct

import pytest
from conftest import independent_frame
from frame_oracle import FrameReader, Outcome, ReadResult
from google.protobuf import any_pb2, struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmesh.exchange import MAGIC, decode_payload, encode_frame

NODE = {"NAME": "p", "NAMESPACE": "default", "LABELS": {"app": "a"}}
NODE_ID = "sidecar~10.0.0.1~p.default~default.svc.cluster.local"


def test_frame_layout_matches_the_spec_derived_example():
    # istio-tcp-telemetry.md §1.3: 231 bytes; magic; data_size 223; Any field 1 (0a 2a + type URL);
    # Any field 2 (12 b0 01 + 176 Struct bytes). The order of map keys inside the Struct is the
    # protobuf runtime's deterministic order, which for keys that prefix one another differs from
    # Envoy's C++ order (see README/issue notes); peers parse map entries in any order.
    frame = encode_frame(NODE, NODE_ID)
    assert len(frame) == 231
    assert frame[:8] == bytes.fromhex("3d230467000000df")
    assert frame[8:10] == bytes.fromhex("0a2a") and frame[10:52] == b"type.googleapis.com/google.protobuf.Struct"
    assert frame[52:55] == bytes.fromhex("12b001") and len(frame) - 55 == 176
    assert frame == encode_frame(dict(reversed(list(NODE.items()))), NODE_ID)  # deterministic
    assert frame == independent_frame(NODE, NODE_ID)


def test_an_independent_frame_is_read_and_ours_decodes_independently():
    metadata = {"NAME": "ratings-v2-1", "NAMESPACE": "default", "WORKLOAD_NAME": "ratings-v2",
                "LABELS": {"app": "ratings", "version": "v2"}, "CLUSTER_ID": "Kubernetes"}
    result = FrameReader().feed(independent_frame(metadata, "id-1") + b"PING\r\n")
    assert (result.outcome, result.rest, result.metadata, result.node_id) == (
        Outcome.FOUND, b"PING\r\n", metadata, "id-1")

    ours = encode_frame(metadata, "id-2")
    envelope = any_pb2.Any()
    envelope.ParseFromString(ours[8:])
    outer = struct_pb2.Struct()
    assert envelope.Unpack(outer)
    assert dict(outer["x-envoy-peer-metadata"]) == {
        **metadata, "LABELS": outer["x-envoy-peer-metadata"]["LABELS"]}
    assert dict(outer["x-envoy-peer-metadata"]["LABELS"]) == metadata["LABELS"]
    assert outer["x-envoy-peer-metadata-id"] == "id-2"


def test_only_istios_exchange_keys_travel_and_an_empty_id_is_left_out():
    frame = encode_frame({**NODE, "SERVICE_ACCOUNT": "sa", "INSTANCE_IPS": "10.0.0.1"})
    metadata, node_id = decode_payload(frame[8:])
    assert metadata == NODE and node_id == ""
    assert b"x-envoy-peer-metadata-id" not in frame


@pytest.mark.parametrize(
    "data, reason",
    [
        (struct.pack("!II", MAGIC, 65537) + b"x" * 10, "declared payload of 65537 bytes exceeds 65536"),
        (struct.pack("!II", MAGIC, 3) + b"\xff\xff\xff", "payload is not a google.protobuf.Any"),
        (independent_frame(NODE, "x", type_url="type.googleapis.com/google.protobuf.Value"),
         "payload holds 'type.googleapis.com/google.protobuf.Value'"),
    ],
)
def test_frames_that_cannot_be_trusted_are_invalid_with_a_reason(data, reason):
    result = FrameReader().feed(data)
    assert result.outcome is Outcome.INVALID
    assert reason in result.reason


def test_bytes_without_the_magic_pass_through_untouched():
    reader = FrameReader()
    assert reader.feed(b"\x3d\x23").outcome is Outcome.NEED_MORE  # could still be the magic
    result = reader.feed(b"\x00MySQL greeting")
    assert (result.outcome, result.rest) == (Outcome.NOT_FOUND, b"\x3d\x23\x00MySQL greeting")


def test_a_truncated_frame_keeps_its_bytes_for_the_caller():
    frame = encode_frame(NODE, NODE_ID)
    reader = FrameReader()
    assert reader.feed(frame[:100]).outcome is Outcome.NEED_MORE
    assert reader.pending() == frame[:100]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def run_reader(chunks: list[bytes]) -> tuple[ReadResult, bytes]:
    """Feed until the reader decides; everything after is application data."""
    reader = FrameReader()
    for index, chunk in enumerate(chunks):
        result = reader.feed(chunk)
        if result.outcome is not Outcome.NEED_MORE:
            return result, result.rest + b"".join(chunks[index + 1:])
    return reader.feed(b""), b""


@settings(max_examples=300, deadline=None)
@given(app=st.binary(max_size=2000), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_of_frame_and_application_bytes_keeps_them_exact(app, cuts):
    frame = encode_frame(NODE, NODE_ID)
    result, application = run_reader(split(frame + app, cuts))
    assert result.outcome is Outcome.FOUND and result.metadata == NODE
    assert application == app


@settings(max_examples=300, deadline=None)
@given(app=st.binary(min_size=1, max_size=2000), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_of_plain_application_bytes_passes_them_whole(app, cuts):
    if app[:4] == struct.pack("!I", MAGIC)[: len(app[:4])]:
        app = b"\x00" + app  # a stream that merely starts like the magic is covered above
    result, application = run_reader(split(app, cuts))
    assert result.outcome is Outcome.NOT_FOUND
    assert application == app
