"""Member records and ring views: what nodes publish in etcd and what clients build from it."""

from __future__ import annotations

import json

import pytest

from kvcache.core.membership import MemberRecord, RingView, member_key, members_prefix
from kvcache.core.protocol import PROTOCOL_VERSION


def test_record_round_trips_and_becomes_a_ring_member():
    record = MemberRecord("n1", "tcp://10.0.0.1:7400", zone="a", weight=2.0, memory_bytes=1 << 30)
    decoded = MemberRecord.decode(record.encode())
    assert decoded == record
    member = decoded.member()
    assert (member.node_id, member.address, member.zone, member.weight) == (
        "n1", "tcp://10.0.0.1:7400", "a", 2.0,
    )  # fmt: skip


def test_keys_live_under_the_cluster_prefix():
    assert members_prefix("prod") == b"/kvcache/prod/members/"
    assert member_key("prod", "node-0") == b"/kvcache/prod/members/node-0"
    for bad in ["", "a/b"]:
        with pytest.raises(ValueError):
            members_prefix(bad)
        with pytest.raises(ValueError):
            member_key("prod", bad)


def test_unknown_fields_from_newer_nodes_are_ignored():
    raw = json.dumps({"node_id": "n", "address": "tcp://h:1", "rack": "r7"}).encode()
    assert MemberRecord.decode(raw) == MemberRecord("n", "tcp://h:1")


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe",
        b"not json",
        b"[1, 2]",
        b'{"address": "tcp://h:1"}',
        b'{"node_id": "n"}',
        b'{"node_id": 5, "address": "tcp://h:1"}',
        b'{"node_id": "n", "address": "tcp://h:1", "weight": 0}',
        b'{"node_id": "n", "address": "tcp://h:1", "weight": "heavy"}',
        b'{"node_id": "n", "address": "tcp://h:1", "weight": true}',
        b'{"node_id": "n", "address": "tcp://h:1", "memory_bytes": 1.5}',
    ],
)
def test_malformed_records_raise_value_error(raw):
    with pytest.raises(ValueError):
        MemberRecord.decode(raw)


def test_ring_view_leaves_out_members_of_another_protocol_version():
    records = [
        MemberRecord("old", "tcp://h:1", protocol_version=PROTOCOL_VERSION - 1),
        MemberRecord("new", "tcp://h:2"),
    ]
    view = RingView.of(42, records)
    assert view.epoch == 42
    assert view.node_ids == {"new"}
